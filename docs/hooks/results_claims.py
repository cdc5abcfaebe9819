"""The reproductions page's claims: each paper claim the project checked, with the numbers read from the reference
JSON at build time (so the page cannot drift from the measurements) and a link to the results section holding them.

The verdicts are written here, beside the numbers they rest on. A claim whose file is missing fails the build with a
message naming the file. Where a measurement has no confidence interval (one seed), the text says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, stdev

from results_io import ResultsError, load_json
from results_tables import Markdown, difference_line, pct, table, times

CLAIMS_MARKER = "<!-- claims: generated from benchmarks/reference/ by docs/hooks/results_claims.py -->"
Link = Callable[[str], str]

AGENTS = ("rte_agents_2026-11-23", "sst2_agents_2026-11-23")
REWARD_STUDY = "rte_reward_study_cpu_2026-12-01"
LEARNED_VS_RULES = "learned_vs_rules_h200_2026-12-01"
LM_TOKENS = "lm_token_comparison_cpu_2026-12-01"
COTRAIN = "rte_cotrain_2026-11-23"
REMEDIES = "cotrain_remedies_h200_2026-12-01"
RECIPES = ("rte_rules_recipes_h100_2026-11-24", "sst2_rules_recipes_h100_2026-11-24")
COMPARISONS = ("rte_comparison_2026-11-24", "sst2_comparison_2026-11-24")
CONTINUAL = "layerskip_continual_h200_2026-12-01"
GENERATION = "generation_speed_h200_2026-12-01"


class Sources:
    """The reference JSON the claims read, loaded once, and links to their results sections."""

    def __init__(self, reference_dir: Path, link: Link) -> None:
        self.reference_dir, self.link, self._cache = reference_dir, link, {}

    def __call__(self, stem: str) -> dict:
        if stem not in self._cache:
            self._cache[stem] = load_json(self.reference_dir / f"{stem}.json")
        return self._cache[stem]

    def cite(self, *stems: str) -> str:
        """"Source: [stem](results/…#stem), …" for the evidence line."""
        return "Source: " + ", ".join(f"[`{stem}`]({self.link(stem)})" for stem in stems) + "."


def _task(stem: str) -> str:
    return {"rte": "RTE", "sst2": "SST-2", "mrpc": "MRPC"}.get(stem.split("_")[0], stem.split("_")[0])


@dataclass(frozen=True)
class Claim:
    """One paper's claim, our verdict on it, the evidence (Markdown read from the reference JSON) and its CI."""

    paper: str
    claim: str
    verdict: str
    body: Markdown
    ci: str

    def section(self, anchor: str) -> Markdown:
        return [f"## {self.paper}: {self.claim} {{#{anchor}}}", "", f"**Verdict: {self.verdict}**", "", *self.body,
                f"**Confidence interval:** {self.ci}", ""]


def _claim(paper: str, claim: str, verdict: str, body: Markdown, ci: str) -> Claim:
    return Claim(paper, claim, verdict, body, ci)


# ---------------------------------------------------------------- the claims


def consistentee_reward(s: Sources) -> Claim:
    rows = []
    for stem in AGENTS:
        for run in s(stem)["runs"]:
            reward = run.get("reward") or {}
            plain = not run.get("options") and "features" not in run["run"]
            if run["agent"] == "reinforce" and reward.get("name") in ("hardness", "vanilla") and plain:
                rows.append([_task(stem), reward["name"], str(reward["alpha"]), pct(run["dev"]["score"]),
                             f"{100 * run['dev']['saved_layers']:.1f} %"])
    study = s(REWARD_STUDY)["rte"]["protocol"]["families"]
    hard, vanilla = (study[f"reinforce[{name}]"]["validated_auc"]["mean"] for name in ("hardness", "vanilla"))
    body = ["REINFORCE with each reward on the same MiniLM traces (one seed each):", "",
            *table(["task", "reward", "α", "dev accuracy", "saved layers"], rows, right={2, 3, 4}),
            f"On cross-fitted RTE states (states the backbone never trained on), every REINFORCE policy under both "
            f"rewards exits at layer 1: validated AUC {100 * hard:.2f} (hardness) against {100 * vanilla:.2f} "
            "(vanilla).", "",
            s.cite(*AGENTS, REWARD_STUDY), ""]
    return _claim("ConsistentEE", "the hardness-guided reward keeps accuracy better at high speedups",
                  "not reproduced", body,
                  "none: one seed per setting, and no bootstrap of the hardness − vanilla difference.")


def consistentee_cotraining(s: Sources) -> Claim:
    rounds = s(COTRAIN)["cotrain"]["rounds"]
    rows = [[str(r["round"]), f"{100 * mean(r['train_per_layer']):.1f}", f"{100 * mean(r['dev_per_layer']):.1f}",
             pct(r["policy_dev"]["score"]) + " at " + times(r["policy_dev"]["speedup"])] for r in rounds]
    remedies = s(REMEDIES)["rows"]

    def change(variant: str, key: str) -> str:
        deltas = [(mean(a[key]) if isinstance(a[key], list) else a[key]) - (mean(b[key]) if isinstance(b[key], list)
                                                                            else b[key])
                  for a, b in zip(remedies[variant], remedies["before"], strict=True)]
        return f"{mean(deltas):+.2f} ± {stdev(deltas):.2f}" if len(deltas) > 1 else f"{deltas[0]:+.2f}"

    seeds = len(remedies["before"])
    remedy_rows = [[f"`{v}`" if "=" in v else v, change(v, "dev_per_layer"), change(v, "reinforce_dev")]
                   for v in remedies if v != "before"]
    body = ["Two rounds on RTE, one seed (mean over the six heads, %):", "",
            *table(["round", "train accuracy", "dev accuracy", "REINFORCE on dev"], rows),
            f"One round from each of {seeds} seeds' backbones; change against the same seed before the round "
            "(mean ± std over seeds, points):", "",
            *table(["variant", "dev accuracy, mean over layers", "REINFORCE on dev"], remedy_rows),
            "A round raises the heads' *training* accuracy, as the paper says; dev accuracy and the retrained policy "
            "do not improve, and the seeds disagree on the sign.", "", s.cite(COTRAIN, REMEDIES), ""]
    return _claim("ConsistentEE", "a round of co-training (backbone and policy in turn) improves the model",
                  "not reproduced", body, f"none: the spread is the std over {seeds} seeds, not a CI.")


def learned_beats_rules(s: Sources) -> Claim:
    tasks = s(LEARNED_VS_RULES)["tasks"]
    body = ["Under the honest protocol (every knob and family chosen on a held-out validation split, numbers on dev, "
            "several seeds), the best learned family against the best rule, by validated AUC:", ""]
    body += [f"- {_task(name)} ({len(t['seeds'])} seeds): {difference_line(t)}" for name, t in tasks.items()]
    tokens = s(LM_TOKENS)["lm_text_agreement"]["protocol"]
    body += [f"- RTE, cross-fitted states, one seed: {difference_line(s(REWARD_STUDY)['rte']['protocol'])}",
             f"- SmolLM2-135M token episodes, one seed: {difference_line(tokens)}",
             "", s.cite(LEARNED_VS_RULES, REWARD_STUDY, LM_TOKENS), ""]
    return _claim("ConsistentEE and learned exit policies", "a learned exit policy beats the best fixed rule",
                  "reproduced on MRPC only (by a small margin); a tie on SST-2 and RTE; the rule wins on token "
                  "episodes", body, "paired bootstrap 95 % CIs over dev rows, given in each line.")


def _rule(recipes: dict, name: str) -> dict:
    return recipes["objectives"]["weighted_ce"]["rules"][name]["dev"]


def pabee(s: Sources) -> Claim:
    rows = []
    for stem in RECIPES:
        recipes = s(stem)
        full = recipes["objectives"]["weighted_ce"]["oracle"]["full_model"]
        rows += [[_task(stem), "full model", pct(full["score"]), times(full["speedup"])]]
        rows += [[_task(stem), f"patience {p}", pct(_rule(recipes, f"patience {p}")["score"]),
                  times(_rule(recipes, f"patience {p}")["speedup"])] for p in (1, 2)]
    aucs = [f"{_task(stem)}: patience {pct(s(stem)[stem.split('_')[0]]['families']['patience']['auc'])} against "
            f"confidence {pct(s(stem)[stem.split('_')[0]]['families']['confidence']['auc'])}" for stem in COMPARISONS]
    body = ["Patience-based exit on MiniLM `weighted_ce` backbones (one seed):", "",
            *table(["task", "rule", "dev accuracy", "speedup"], rows, right={2, 3}),
            f"Area under the dev trade-off curve: {'; '.join(aucs)}.", "", s.cite(*RECIPES, *COMPARISONS), ""]
    return _claim("PABEE", "patience-based exit saves layers while keeping or improving the full model's accuracy",
                  "not reproduced: it saves layers, but loses accuracy, and trails the confidence rule", body,
                  "none: one seed.")


def calm(s: Sources) -> Claim:
    rows, within = [], []
    for stem in RECIPES:
        recipes = s(stem)["objectives"]["weighted_ce"]
        for name, result in recipes["rules"].items():
            info = result.get("info") or {}
            if not name.startswith("calm") or "calibration_risk" not in info:
                continue
            dev = result["dev"]
            risk = dev["disagreement"] if info.get("risk") == "consistency" else dev["loss_increase"]
            rows.append([_task(stem), name.removeprefix("calm "), f"{info['threshold']:.3f}",
                         f"{info['calibration_risk']:.3f}", f"**{risk:.3f}**",
                         "yes" if risk <= info["delta"] else "no"])
        halves_of_dev = recipes.get("calm_on_dev_halves", {})
        within += [(_task(stem), k, v["fraction_within_delta"]) for k, v in halves_of_dev.items()]
    halves = "; ".join(f"{task} {name}: {100 * frac:.0f} %" for task, name, frac in within)
    body = ["Learn-then-Test certificates (ε = 0.05) on the held-out split, then the risk measured on dev:", "",
            *table(["task", "measure, δ", "threshold", "calibration risk", "dev risk", "dev risk ≤ δ"], rows,
                   right={2, 3, 4}),
            "SST-2's held-out rows (phrases from its training split) and its dev sentences differ in distribution. "
            f"Certified on one random half of dev and tested on the other, 100 times, the risk stayed within δ in: "
            f"{halves} of splits (the method promises 1 − ε = 95 %).", "", s.cite(*RECIPES), ""]
    return _claim("CALM", "Learn-then-Test keeps the risk within δ with probability 1 − ε",
                  "reproduced when calibration and test rows share a distribution (RTE; SST-2's dev halves); not "
                  "across SST-2's train → dev shift", body,
                  "the guarantee is itself probabilistic; the dev-halves check counts the splits within δ (100 "
                  "repeats). One backbone per task.")


def _gen_points(s: Sources) -> tuple[list[dict], dict]:
    run = next(r for r in s(GENERATION)["runs"] if r.get("label") == "continued")
    return [p for p in run["points"] if "batch" in p], run["baselines"]


def _knob(point: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in point.get("knob", {}).items())


def free_and_calm_decoding(s: Sources) -> Claim:
    points, _ = _gen_points(s)
    rows = []
    for batch in (1, 16):
        calm_points = [p for p in points if p["method"] == "calm" and p["batch"] == batch]
        for p in sorted((p for p in points if p["method"] == "free" and p["batch"] == batch),
                        key=lambda p: -p["speedup_vs_compiled"]):
            faster = [c for c in calm_points if c["speedup_vs_compiled"] >= p["speedup_vs_compiled"]]
            best = max(faster, key=lambda c: c["rouge_l"]) if faster else None
            rows.append([str(batch), _knob(p), f"{p['speedup_vs_compiled']:.2f}×", f"{p['rouge_l']:.2f}",
                         f"{best['rouge_l']:.2f} ({_knob(best)}, {best['speedup_vs_compiled']:.2f}×)" if best
                         else "none as fast"])
    body = ["SmolLM2-135M continued with LayerSkip, bf16 on an H200; quality is ROUGE-L against full greedy decoding, "
            "speed is tokens/s over transformers' compiled `generate`. For each FREE setting, the best CALM setting "
            "(softmax margin, decaying λ) that is at least as fast:", "",
            *table(["batch", "FREE setting", "× compiled", "FREE ROUGE-L", "best CALM ROUGE-L at ≥ that speed"], rows,
                   right={0, 2, 3}),
            s.cite(GENERATION), ""]
    return _claim("FREE", "synchronized parallel decoding gives better quality than CALM at equal speed",
                  "reproduced: at every FREE setting, the CALM settings at least as fast give "
                  "lower ROUGE-L", body, "none: one run per setting, one model.")


def layerskip(s: Sources) -> Claim:
    arms = s(CONTINUAL)["arms"]
    rows = []
    for corpus in ("glue", "code"):
        for arm in ("untouched", "plain", "layerskip"):
            held = arms[arm]["held_out"][corpus]
            rows.append([corpus, arm, f"{held['perplexity'][-1]:.3g}", f"{100 * held['agreement'][23]:.1f}"])
    points, _ = _gen_points(s)
    best = max((p for p in points if p["method"] == "selfspec" and p["batch"] == 1),
               key=lambda p: p["speedup_vs_compiled"])
    recipes = [(_task(stem), s(stem)["objectives"]) for stem in RECIPES]
    layer_rows = [[task, "`layerskip`", " / ".join(f"{100 * (a - b):+.1f}" for a, b in zip(
        o["layerskip"]["dev_per_layer"], o["weighted_ce"]["dev_per_layer"], strict=True))] for task, o in recipes]
    body = ["SmolLM2-135M continued on the same tokens with and without LayerSkip (held-out text, one seed):", "",
            *table(["corpus", "training", "last-layer perplexity", "layer 24 agrees with the last (%)"], rows,
                   right={2, 3}),
            f"Self-speculative decoding on the continued model (H200, batch 1): best {best['tokens_per_s']} tokens/s "
            f"at exit layer {best['knob']['exit_layer']}, {best['knob']['draft_tokens']} drafts, "
            f"{best['speedup_vs_compiled']:.2f}× transformers' compiled full model (acceptance {best['acceptance']}).",
            "", "On the MiniLM classifiers, LayerSkip's recipe against weighted CE, per-layer dev accuracy change "
            "(points):", "", *table(["task", "recipe", "layers 1..6"], layer_rows, right=set()),
            s.cite(CONTINUAL, GENERATION, *RECIPES), ""]
    return _claim("LayerSkip", "early exits become usable, the last layer stays close to plain training, and "
                  "self-speculative decoding is faster", "partly: the early exits become usable; the last layer's "
                  "perplexity is worse than plain continued training, and self-speculative decoding is slower than the "
                  "compiled full model here", body, "none: one seed, one setting of the recipe, not tuned.")


def _recipe_claim(s: Sources, recipe: str) -> Markdown:
    rows = []
    for stem in RECIPES:
        o = s(stem)["objectives"]
        rows.append([_task(stem), " / ".join(f"{100 * v:.1f}" for v in o["weighted_ce"]["dev_per_layer"]),
                     " / ".join(f"{100 * v:.1f}" for v in o[recipe]["dev_per_layer"])])
    return ["Per-layer dev accuracy (%) of MiniLM fine-tuned with weighted CE and with the recipe (bf16, H100, one "
            "seed):", "", *table(["task", "weighted CE, layers 1..6", f"`{recipe}`, layers 1..6"], rows, right=set()),
            s.cite(*RECIPES), ""]


def sweet(s: Sources) -> Claim:
    return _claim("SWEET", "separating the layers' weights makes early classifiers better without hurting the last one",
                  "not reproduced: the last layers lose accuracy on SST-2, and every layer falls on RTE",
                  _recipe_claim(s, "sweet"), "none: one seed.")


def deebert(s: Sources) -> Claim:
    sst2 = s(RECIPES[1])["objectives"]
    losses = [100 * (a - b) for a, b in zip(sst2["weighted_ce"]["dev_per_layer"], sst2["deebert"]["dev_per_layer"],
                                            strict=True)]
    where = "at every layer" if min(losses) > 0 else "at some layers"
    body = [*_recipe_claim(s, "deebert"),
            "DeeBERT's last head is plain fine-tuning by construction; the paper's comparison (against plain "
            "fine-tuning with no exits) was not rerun, so this checks the recipe against joint training only.", ""]
    return _claim("DeeBERT", "training the early heads after the backbone, on it frozen, gives usable exits at "
                  "little cost", "not checked as stated; against joint training (weighted CE) its heads are "
                  f"{min(losses):.1f}–{max(losses):.1f} points worse {where} on SST-2, and mixed on RTE", body,
                  "none: one seed.")


def berxit(s: Sources) -> Claim:
    rows = []
    for stem in COMPARISONS:
        families = s(stem)[stem.split("_")[0]]["families"]
        rows.append([_task(stem), pct(families["lte"]["auc"]), pct(families["confidence"]["auc"])])
    body = ["Area under the dev trade-off curve of BERxiT's learn-to-exit rule (`lte`) and the max-prob rule, on the "
            "same `weighted_ce` traces (one seed):", "",
            *table(["task", "lte AUC", "confidence AUC"], rows), s.cite(*COMPARISONS), ""]
    return _claim("BERxiT", "learning to predict each layer's correctness gives better exits than confidence",
                  "not reproduced: below the confidence rule on both tasks", body, "none: one seed.")


CLAIMS = (learned_beats_rules, consistentee_reward, consistentee_cotraining, pabee, calm, free_and_calm_decoding,
          layerskip, sweet, deebert, berxit)


def claims_markdown(reference_dir: Path, link: Link) -> str:
    """A summary table of every claim, then each claim's section; numbers read from `reference_dir`, links to the
    results sections made by `link(stem)`."""
    sources = Sources(reference_dir, link)
    claims: list[tuple[str, Claim]] = []
    for check in CLAIMS:
        try:
            claims.append((check.__name__.replace("_", "-"), check(sources)))
        except ResultsError:
            raise
        except (KeyError, IndexError, TypeError, StopIteration, ValueError) as error:
            raise ResultsError(f"{reference_dir}: the '{check.__name__}' claim could not read its numbers "
                               f"({type(error).__name__}: {error}); fix docs/hooks/results_claims.py") from error
    out = table(["paper", "claim", "verdict", "confidence interval"],
                [[c.paper, f"[{c.claim}](#{anchor})", c.verdict, "yes" if c.ci.startswith("paired") else "none"]
                 for anchor, c in claims], right=set())
    for anchor, claim in claims:
        out += claim.section(anchor)
    return "\n".join(out)
