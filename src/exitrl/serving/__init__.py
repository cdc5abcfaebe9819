"""The parts of ``exitrl serve`` below its command line (`exitrl.serve`), one idea per module: the served runs
(`exitrl.serving.runs`), the checks every request passes before a worker sees it (`exitrl.serving.requests`), the
Prometheus metrics summed over LitServe's processes (`exitrl.serving.metrics`) and the LitServe API the inference
workers run (`exitrl.serving.api`). Nothing is imported here, so LitServe, prometheus_client and torch load only
where they are used."""
