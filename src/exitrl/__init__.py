"""exitrl: learn when a transformer may stop computing.

Early exiting posed as reinforcement learning: a frozen (or co-trained) multi-exit backbone is traced once,
the trace drives Gymnasium / torch vector envs, and learned agents and classic rules all yield one
:class:`~exitrl.policy.ExitPolicy` that is evaluated under one metric contract.
"""

__version__ = "0.1.0"
