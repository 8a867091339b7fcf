"""Selection: which backend runs the forward and which the backward of a problem, and why.

Candidates are the registered backends with no reasons against the problem, ordered by the active
policy; with autotuning on, the candidates are timed on the caller's tensors instead. A forced
backend (the `backend=` argument, or `FLASHDISPATCH_BACKEND`) that refuses the problem raises
`NoBackendError` with its reasons: there is no silent fallback.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from ..backends.base import Backend
from ..backends.empty import EMPTY
from .capabilities import Capabilities
from .policy import DECODE_MAX_SEQLEN_Q, active_policy, order
from .problem import Problem
from .registry import REGISTRY

log = logging.getLogger("flashdispatch")
DIRECTIONS = ("forward", "backward")


class NoBackendError(RuntimeError):
    """No registered backend can run the problem (or the forced one cannot); `reasons` says why."""

    def __init__(self, message: str, problem: Problem, reasons: dict[str, list[str]]):
        super().__init__(message)
        self.problem = problem
        self.reasons = reasons


@dataclass(frozen=True)
class Choice:
    backend: Backend
    how: str  # "forced by ...", "policy rank ...", "measured ..."


@dataclass(frozen=True)
class Decision:
    problem: Problem
    forward: Choice
    backward: Choice | None  # None when no gradient is needed


def reasons_for(backend: Backend, problem: Problem, caps: Capabilities, direction: str) -> list[str]:
    """The backend's reasons against running `direction` of `problem`; a raising plugin counts as a reason."""
    try:
        if direction == "forward":
            return list(backend.not_supported_reasons(problem, caps))
        return list(backend.backward_not_supported_reasons(problem, caps))
    except Exception as exc:  # noqa: BLE001 - a broken plugin must not break selection
        return [f"its not_supported_reasons() raised {type(exc).__name__}: {exc}"]


def _format_reasons(reasons: dict[str, list[str]]) -> str:
    return "\n".join(f"  {name}: {'; '.join(r)}" for name, r in reasons.items())


def _choose(problem: Problem, caps: Capabilities, direction: str, forced: str | None, forced_by: str,
            measure=None) -> Choice:
    registered = REGISTRY.backends()
    if forced is not None:
        backend = REGISTRY.get(forced)
        reasons = reasons_for(backend, problem, caps, direction)
        if reasons:
            raise NoBackendError(
                f"backend {forced!r} ({forced_by}) cannot run the {direction} of {problem.describe()}: "
                f"{'; '.join(reasons)}", problem, {forced: reasons})
        return Choice(backend, f"forced by {forced_by}")
    policy = active_policy()
    decoding = direction == "forward" and problem.seqlen_q <= DECODE_MAX_SEQLEN_Q
    names, where = policy.ranking(caps, "decode" if decoding else direction)
    ranked = order(names, list(registered))
    rejected = {}
    candidates = []
    for name in ranked:
        reasons = reasons_for(registered[name], problem, caps, direction)
        if reasons:
            rejected[name] = reasons
        else:
            candidates.append(name)
    if not candidates:
        unranked = {n: ["not ranked by the active policy"] for n in registered if n not in ranked}
        raise NoBackendError(
            f"no backend can run the {direction} of {problem.describe()}:\n" + _format_reasons({**rejected, **unranked}),
            problem, {**rejected, **unranked})
    if policy.autotune and measure is not None and len(candidates) > 1:
        times = {name: measure(registered[name], problem, direction) for name in candidates}
        best = min(times, key=times.get)
        table = ", ".join(f"{n} {t * 1e3:.3f} ms" for n, t in sorted(times.items(), key=lambda kv: kv[1]))
        return Choice(registered[best], f"measured fastest of {len(candidates)} candidates ({table})")
    best = candidates[0]
    above = [name for name in ranked[: ranked.index(best)] if name in rejected]
    skipped = f"; ranked above it but refusing: {', '.join(above)}" if above else ""
    return Choice(registered[best], f"policy rank {ranked.index(best) + 1} of {len(ranked)} ({where}){skipped}")


def decide(problem: Problem, caps: Capabilities, forced: tuple[str | None, str | None] = (None, None),
           forced_by: str = "", measure=None) -> Decision:
    """Choose the forward (and, when `problem.needs_grad`, the backward) backend."""
    forced_forward, forced_backward = forced
    if problem.is_empty or problem.total_k == 0:
        # Nothing to compute; a forced backend must still accept the problem.
        for name, direction in ((forced_forward, "forward"), (forced_backward, "backward")):
            if name is not None and (direction == "forward" or problem.needs_grad):
                _choose(problem, caps, direction, name, forced_by)
        empty = Choice(EMPTY, "nothing to compute (no queries, no keys or no value dims): zeros")
        return Decision(problem, empty, empty if problem.needs_grad else None)
    forward = _choose(problem, caps, "forward", forced_forward, forced_by, measure)
    backward = None
    if problem.needs_grad:
        if forced_backward is None and forced_forward is not None:
            # Forcing a backend forces its backward too, if it has one.
            if not reasons_for(forward.backend, problem, caps, "backward"):
                forced_backward = forced_forward
        if forced_backward is None:
            backward = _choose(problem, caps, "backward", None, "", measure)
            if forced_forward is not None or backward.backend is not forward.backend:
                backward = Choice(backward.backend, backward.how + f"; pairs with the {forward.backend.name} forward through the saved LSE")
        else:
            backward = _choose(problem, caps, "backward", forced_backward, forced_by, measure)
    decision = Decision(problem, forward, backward)
    log.debug("flashdispatch: %s -> forward %s (%s)%s", problem.describe(), forward.backend.name, forward.how,
              f", backward {backward.backend.name} ({backward.how})" if backward else "")
    return decision


@dataclass(frozen=True)
class Explanation:
    """Every registered backend against one problem, and what runs. `str()` gives a table."""

    problem: Problem
    caps: Capabilities
    reasons: dict[str, dict[str, list[str]]]  # backend -> direction -> reasons
    decision: Decision | None
    error: str | None  # why nothing can run, if so
    notes: dict[str, list[str]]  # chosen backend -> its notes (tuning state, compile times)

    @property
    def forward(self) -> str | None:
        return self.decision.forward.backend.name if self.decision else None

    @property
    def backward(self) -> str | None:
        return self.decision.backward.backend.name if self.decision and self.decision.backward else None

    def __str__(self) -> str:
        lines = [f"problem : {self.problem.describe()}", f"device  : {self.caps.device} ({self.caps.name}, {self.caps.arch})"]
        if self.decision is None:
            lines.append(f"error   : {self.error}")
        else:
            lines.append(f"forward : {self.forward} ({self.decision.forward.how})")
            if self.decision.backward is not None:
                lines.append(f"backward: {self.backward} ({self.decision.backward.how})")
            for name, notes in self.notes.items():
                lines.extend(f"note    : {name}: {note}" for note in notes)
        width = max([len(n) for n in self.reasons] + [7])
        lines.append("")
        lines.append(f"{'backend':<{width}}  forward  backward  reasons")
        for name, by_direction in self.reasons.items():
            fwd, bwd = by_direction["forward"], by_direction["backward"]
            extra = [f"backward: {r}" for r in bwd if r not in fwd]
            lines.append(f"{name:<{width}}  {'no' if fwd else 'yes':<7}  {'no' if bwd else 'yes':<8}  "
                         f"{'; '.join(fwd + extra) or '-'}")
        return "\n".join(lines)


def explain_problem(problem: Problem, caps: Capabilities, forced=(None, None), forced_by="", measure=None) -> Explanation:
    problem = problem.for_backward()
    reasons = {name: {d: reasons_for(b, problem, caps, d) for d in DIRECTIONS} for name, b in REGISTRY.backends().items()}
    try:
        decision, error = decide(problem, caps, forced, forced_by, measure), None
    except NoBackendError as exc:
        decision, error = None, str(exc)
        try:  # the forward alone may still run (FP8 is forward only): show what would run it
            decision = decide(replace(problem, needs_grad=False), caps, forced, forced_by, measure)
        except NoBackendError:
            pass
    notes = {}
    if decision is not None:
        for choice in (decision.forward, decision.backward):
            if choice is not None and choice.backend.name not in notes:
                try:
                    notes[choice.backend.name] = list(choice.backend.notes(problem, caps))
                except Exception as exc:  # noqa: BLE001 - a broken plugin must not break explain()
                    notes[choice.backend.name] = [f"its notes() raised {type(exc).__name__}: {exc}"]
    return Explanation(problem, caps, reasons, decision, error, notes)
