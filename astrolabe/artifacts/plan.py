"""The training run as a graph of stage calls: plan, status, resume, rerun one stage (no Prefect here).

The plan of a run with ``N = pipeline.iterations``::

    filter_prompts                                    (once)
    evaluate[0]        <- prompts                     (the base model)
    arcopo_buffer      <- prompts                     (once; rl.algorithm arcopo with arcopo.semi only; it is
                                                       also an input "buffer" of every nft_update)
    for k in 0 .. N-1:
      rollout[k]       <- prompts, checkpoint = nft_update[k-1] (k > 0)
      score[k]         <- rollout[k]
      label_uncertainty[k] <- rollout[k], score[k], checkpoint = nft_update[k-1] (k > 0, selective KL:
                          the KL controller is training state, read from the checkpoint)
      nft_update[k]    <- rollout[k], labels = label_uncertainty[k], checkpoint = nft_update[k-1] (k > 0)
      evaluate[k+1]    <- prompts, checkpoint = nft_update[k], baseline = evaluate[0]
                          (when k+1 is a multiple of eval_every, and always at k+1 = N)

A node's output directory is keyed by its config subset and its inputs' identities
(:func:`astrolabe.artifacts.keys.key_from_identities`), so the status of every node follows from the config
and what is on disk: ``done`` (the expected key is complete and its files match its manifest), ``damaged``
(the expected key is complete but a file was changed, deleted or added since), ``stale`` (only outputs of
other keys exist, e.g. made before a config change or before an input was forced), ``missing``. Running the plan skips
done nodes: that is resume. A *runner* executes one node; the default calls
:func:`astrolabe.artifacts.engine.execute` directly, the Prefect flow wraps the same call in a task.

The plan names stages; their modules come from the caller as a registry (``stages.STAGES``: name ->
module), so this package never imports ``stages/``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from astrolabe.artifacts.engine import execute
from astrolabe.artifacts.keys import input_identity, key_from_identities
from astrolabe.artifacts.manifest import MANIFEST_NAME, ArtifactError, Manifest
from astrolabe.artifacts.stage import StageRegistry
from astrolabe.artifacts.stagedir import StageDir, find_current, stage_root
from astrolabe.config import RunConfig, config_to_dict

log = logging.getLogger(__name__)

Status = Literal["done", "damaged", "stale", "missing"]
STATUSES: tuple[Status, ...] = ("done", "damaged", "stale", "missing")
NodeId = tuple[str, "int | None"]


@dataclass(frozen=True)
class Node:
    """One stage call of the plan: ``inputs`` maps the stage's input names to the nodes producing them."""

    stage: str
    iteration: int | None
    inputs: tuple[tuple[str, NodeId], ...] = ()

    @property
    def id(self) -> NodeId:
        return (self.stage, self.iteration)

    @property
    def label(self) -> str:
        return self.stage if self.iteration is None else f"{self.stage}[{self.iteration}]"


def eval_points(cfg: RunConfig) -> list[int]:
    """Policy versions (completed iterations) that are evaluated: 0, every ``eval_every``, and the last."""
    n, every = cfg.pipeline.iterations, cfg.pipeline.eval_every
    return sorted({0, n} | {k for k in range(1, n + 1) if k % every == 0})


def build_plan(cfg: RunConfig, iterations: int | None = None) -> list[Node]:
    """The nodes of the run in execution order (module docstring); ``iterations`` overrides the count."""
    n = cfg.pipeline.iterations if iterations is None else iterations
    evals = set(eval_points(cfg))
    prompts: NodeId = ("filter_prompts", None)
    nodes = [Node("filter_prompts", None), Node("evaluate", 0, (("prompts", prompts),))]
    buffer: tuple[tuple[str, NodeId], ...] = ()
    if cfg.rl.algorithm == "arcopo" and cfg.arcopo.semi is not None:  # AR-CoPO semi-on-policy replay buffer
        nodes.append(Node("arcopo_buffer", None, (("prompts", prompts),)))
        buffer = (("buffer", ("arcopo_buffer", None)),)
    for k in range(n):
        prev = (("checkpoint", ("nft_update", k - 1)),) if k > 0 else ()
        controller = prev if cfg.rl.selective_kl else ()
        nodes += [
            Node("rollout", k, (("prompts", prompts), *prev)),
            Node("score", k, (("rollout", ("rollout", k)),)),
            Node("label_uncertainty", k, (("rollout", ("rollout", k)), ("score", ("score", k)), *controller)),
            Node("nft_update", k, (("rollout", ("rollout", k)), ("labels", ("label_uncertainty", k)), *prev, *buffer)),
        ]
        if k + 1 in evals:
            nodes.append(Node("evaluate", k + 1, (("prompts", prompts), ("checkpoint", ("nft_update", k)),
                                                   ("baseline", ("evaluate", 0)))))
    return nodes


def output_dir(run_path: Path, manifest: Manifest) -> Path:
    return stage_root(run_path, manifest.stage, manifest.iteration) / manifest.key


# ----------------------------------------------------------------------------------- status


@dataclass(frozen=True)
class NodeStatus:
    node: Node
    status: Status
    expected_key: str | None  # None when an input is not done (the key cannot be known yet)
    path: Path | None  # the expected output (done, damaged) or the newest other output (stale)
    problems: tuple[str, ...] = ()  # what differs from the manifest (damaged)


def plan_status(cfg: RunConfig, run_path: Path, stages: StageRegistry, iterations: int | None = None,
                check_sha: bool = True) -> list[NodeStatus]:  # fmt: skip
    """Status of every node of the plan, from the config and the run directory only (nothing runs).

    Every complete expected output is checked against its manifest: sizes always, sha256 unless
    ``check_sha=False``. A damaged node still gives its dependents their keys (its manifest is intact):
    they stay ``done`` when a recomputation reproduces it.
    """
    done: dict[NodeId, Manifest] = {}
    out: list[NodeStatus] = []
    for node in build_plan(cfg, iterations):
        module = stages[node.stage]
        key = None
        if all(src in done for _, src in node.inputs):
            key = key_from_identities(module, cfg, {n: input_identity(done[src]) for n, src in node.inputs})
            sd = StageDir(run_path, node.stage, key, node.iteration)
            problems = sd.damage(check_sha)
            if problems is not None:
                done[node.id] = sd.load_manifest()
                out.append(NodeStatus(node, "damaged" if problems else "done", key, sd.path, tuple(problems)))
                continue
        other = find_current(run_path, node.stage, node.iteration)
        out.append(NodeStatus(node, "stale" if other else "missing", key, other.path if other else None))
    return out


# ----------------------------------------------------------------------------------- running

Runner = Callable[[Node, Mapping[str, Path], bool], Manifest]


def direct_runner(cfg: RunConfig, run_path: Path, stages: StageRegistry) -> Runner:
    """Run a node in this process through :func:`astrolabe.artifacts.engine.execute`."""

    def run(node: Node, inputs: Mapping[str, Path], force: bool) -> Manifest:
        return execute(stages[node.stage], cfg, run_path, inputs, node.iteration, force=force)

    return run


@dataclass
class NodeResult:
    node: Node
    manifest: Manifest
    path: Path
    cached: bool


@dataclass
class RunResults:
    """Outputs of the nodes run so far, by node id."""

    by_id: dict[NodeId, NodeResult] = field(default_factory=dict)

    def path(self, node_id: NodeId) -> Path:
        return self.by_id[node_id].path

    def manifest(self, node_id: NodeId) -> Manifest:
        return self.by_id[node_id].manifest


def run_plan(
    cfg: RunConfig,
    run_path: Path,
    stages: StageRegistry,
    runner: Runner | None = None,
    on_done: Callable[[NodeResult, RunResults], None] | None = None,
    iterations: int | None = None,
) -> RunResults:
    """Run every node of the plan in order (done ones are skipped by the runner's cache check)."""
    runner = runner or direct_runner(cfg, run_path, stages)
    results = RunResults()
    for node in build_plan(cfg, iterations):
        inputs = {name: results.path(src) for name, src in node.inputs}
        before = _complete_keys(run_path, node)
        manifest = runner(node, inputs, False)
        res = NodeResult(node, manifest, output_dir(run_path, manifest), cached=before.get(manifest.key) == manifest.created)
        results.by_id[node.id] = res
        if on_done is not None:
            on_done(res, results)
    return results


def _complete_keys(run_path: Path, node: Node) -> dict[str, str]:
    """``{key: created}`` of the node's published outputs (a recomputed one has a new ``created``)."""
    root = stage_root(run_path, node.stage, node.iteration)
    if not root.is_dir():
        return {}
    out = {}
    for p in root.iterdir():
        if not p.name.startswith(".") and (p / MANIFEST_NAME).is_file():
            try:
                out[p.name] = Manifest.load(p).created
            except ArtifactError:
                continue
    return out


class StageInputError(RuntimeError):
    """A single-stage rerun whose inputs are not all done."""


def find_node(cfg: RunConfig, stages: StageRegistry, stage: str, iteration: int | None) -> Node:
    if stage not in stages:
        raise KeyError(f"unknown stage {stage!r}; stages: {', '.join(stages)}")
    if not stages[stage].STAGE.per_iteration:
        iteration = None
    for node in build_plan(cfg):
        if node.id == (stage, iteration):
            return node
    its = sorted({n.iteration for n in build_plan(cfg) if n.stage == stage and n.iteration is not None})
    raise KeyError(f"the plan has no {stage} at iteration {iteration}; it has iterations {its}")


def run_stage(cfg: RunConfig, run_path: Path, stages: StageRegistry, stage: str, iteration: int | None,
              force: bool, runner: Runner | None = None) -> NodeResult:  # fmt: skip
    """Run one node from its inputs' current (done) outputs; ``force`` reruns it even when done.

    Upstream is never touched. After a forced rerun the node's consumers are stale (see
    :func:`astrolabe.artifacts.keys.input_identity`); ``astrolabe train`` recomputes them.
    """
    node = find_node(cfg, stages, stage, iteration)
    status = {s.node.id: s for s in plan_status(cfg, run_path, stages)}
    inputs: dict[str, Path] = {}
    for name, src in node.inputs:
        st = status[src]
        if st.status != "done" or st.path is None:
            what = f"damaged ({'; '.join(st.problems)})" if st.status == "damaged" else st.status
            raise StageInputError(
                f"input {name!r} of {node.label} ({st.node.label}) is {what}; run `astrolabe train` "
                "(or rerun that stage first) so every input is current"
            )
        inputs[name] = st.path
    runner = runner or direct_runner(cfg, run_path, stages)
    manifest = runner(node, inputs, force)
    return NodeResult(node, manifest, output_dir(run_path, manifest), cached=not force and status[node.id].status == "done")


# ----------------------------------------------------------------------------------- config changes


def flatten(d: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(old: RunConfig, new: RunConfig) -> list[tuple[str, object, object]]:
    """``(dotted key, old value, new value)`` for every setting that differs."""
    a, b = flatten(config_to_dict(old)), flatten(config_to_dict(new))
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def explain_change(old: RunConfig, new: RunConfig, run_path: Path, stages: StageRegistry) -> str | None:
    """A message naming the changed settings and the completed stages they make stale; None if unchanged."""
    diff = config_diff(old, new)
    if not diff:
        return None
    lines = ["the config differs from the previous attempt of this run:"]
    lines += [f"  {k}: {a!r} -> {b!r}" for k, a, b in diff]
    made = ("done", "damaged")  # a damaged output is recomputed either way: count it as made
    old_done = {s.node.id for s in plan_status(old, run_path, stages, check_sha=False) if s.status in made}
    new_status = {s.node.id: s.status for s in plan_status(new, run_path, stages, check_sha=False)}
    stale = [f"{s}[{i}]" if i is not None else s for (s, i) in old_done if new_status.get((s, i)) not in made]
    if stale:
        lines.append("completed stages that will be recomputed: " + ", ".join(sorted(stale)))
    else:
        lines.append("no completed stage depends on these settings: everything done stays cached")
    return "\n".join(lines)
