"""Agents: a minimal tool-using loop from scratch, with reflection, voting and a failure taxonomy
(Part 6, chapter 04; the tools and the call format come from :mod:`utils.tools`, chapter 03).

An *agent* here is a loop around a chat model: the model reads the task and either calls a tool or
answers; a call is parsed, run, and its result handed back as a message; the loop repeats until the
model answers or its step budget runs out. Every piece is small and model-agnostic:

- **The model** is any callable ``generate(chats) -> replies`` that maps a list of chats (each a
  list of ``{"role", "content"}`` messages) to one reply each, so the loop is tested with a scripted
  fake. :class:`utils.chat.ChatGenerator` is the real one: a Hugging Face causal LM, greedy or sampled,
  optionally under a token mask (:mod:`utils.constrained`), batched, with the prompt prefix that
  every chat of a call shares (system prompt and examples) prefilled once and its cache reused.
- **The loop** (:func:`run_agents`) runs many tasks in lock step, one batched model call per step.
  A reply that contains ``<tool_call>`` is a call (:func:`utils.tools.parse_tool_call`; a malformed
  one comes back to the model as an error message); any other reply is the final answer
  (:func:`extract_answer`: the text after ``Answer:``, else the whole reply).
- **Reflection**: a *checker* looks at each answer before it is accepted and may send feedback
  (a user message); the run then continues with :data:`REFLECTION_STEPS` more model calls.
  :func:`grounded_checker` is an external checker -- it compares the answer with what the tools
  returned, never with the gold answer; :func:`self_critique_checker` asks the model itself.
- **Voting**: :func:`utils.prompting.majority_vote` with ``same=answers_match`` over the answers of
  independent sampled runs (equal numbers count as one answer).
- **Scoring and failures**: :func:`answers_match` (numbers compared as numbers) and
  :func:`classify_failure`, which puts every run into one class of :data:`FAILURE_KINDS`, computed
  from the transcript and the task's expected tools and intermediate results.
"""
from __future__ import annotations

import copy
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from utils.checks import check_positive_int
from utils.tools import (ToolCall, ToolCallError, ToolRegistry, ToolResult, parse_tool_call,
                         run_tool, tool_call_regex, tool_message)

__all__ = [
    "ANSWER_PREFIX",
    "FAILURE_KINDS",
    "REFLECTION_STEPS",
    "AgentRun",
    "AgentStep",
    "AgentTask",
    "Check",
    "answers_match",
    "classify_failure",
    "extract_answer",
    "grounded_checker",
    "reflect",
    "run_agents",
    "self_critique_checker",
    "step_regex",
    "step_runs",
]

ANSWER_PREFIX = "Answer:"
REFLECTION_STEPS = 2
"""Model calls a run gets after each piece of checker feedback (one to call a tool, one to answer)."""

FAILURE_KINDS = ("correct", "step budget exhausted", "no tool call", "wrong tool", "bad arguments",
                 "ignored observation", "wrong final answer")
"""The classes of :func:`classify_failure`, in the order they are tested."""

Chat = list[dict]
Generate = Callable[[list[Chat]], list[str]]


# ============================================================================ tasks and runs


@dataclass(frozen=True)
class AgentTask:
    """A task with a checkable answer: the ``question`` the agent reads, the gold ``answer``, the
    ``tools`` a correct solution uses (in order) and ``checkpoints``, intermediate results a correct
    path observes (e.g. ``("84",)`` for "12 * 7, then minus 15"). ``kind`` names the task family."""

    id: str
    question: str
    answer: str
    tools: tuple[str, ...] = ()
    checkpoints: tuple[str, ...] = ()
    kind: str = ""


@dataclass
class AgentStep:
    """One model reply and what the loop did with it: the parsed ``call`` and its ``result``, or
    the ``error`` of a malformed call, or (for a final answer) the checker's ``feedback``."""

    reply: str
    call: ToolCall | None = None
    result: ToolResult | None = None
    error: str | None = None
    feedback: str | None = None


@dataclass
class AgentRun:
    """The transcript and cost of one task: the ``chat`` as the model saw it, the ``steps``, the
    final ``answer`` (None if the budget ran out), why it stopped (``"answer"`` or ``"budget"``),
    and its cost: ``model_calls`` (critiques included), ``generated_tokens`` and ``seconds`` (each
    batched call's wall time shared equally among the runs in it)."""

    task: AgentTask
    chat: Chat
    steps: list[AgentStep] = field(default_factory=list)
    answer: str | None = None
    stop: str = ""
    model_calls: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    reflections: int = 0

    @property
    def correct(self) -> bool:
        """Whether the final answer matches the gold answer (:func:`answers_match`)."""
        return self.answer is not None and answers_match(self.answer, self.task.answer)

    @property
    def calls(self) -> list[ToolCall]:
        """The well-formed tool calls, in order."""
        return [s.call for s in self.steps if s.call is not None]

    @property
    def observations(self) -> list[Any]:
        """The values of the calls that succeeded, in order."""
        return [s.result.value for s in self.steps if s.result is not None and s.result.ok]


@dataclass(frozen=True)
class Check:
    """A checker's verdict on one answer: ``feedback`` for the model (None accepts the answer) and
    what the check cost in ``model_calls`` and ``tokens`` (0 for an external checker)."""

    feedback: str | None
    model_calls: int = 0
    tokens: int = 0


Checker = Callable[[list[AgentRun]], list[Check]]


# ============================================================================ answers


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _number(text: str) -> float | None:
    found = _NUMBER.search(text.replace(",", ""))
    return float(found.group()) if found else None


def _norm(text: str) -> str:
    return " ".join(text.casefold().strip(" \t\n.'\"`").split())


def extract_answer(reply: str) -> str:
    """The final answer in a reply: the text after the last ``Answer:`` up to the end of its line,
    else the whole reply; stripped."""
    if not isinstance(reply, str):
        raise TypeError(f"reply must be a str, got {type(reply).__name__}")
    at = reply.rfind(ANSWER_PREFIX)
    if at < 0:
        return reply.strip()
    return reply[at + len(ANSWER_PREFIX):].strip().split("\n")[0].strip()


def answers_match(answer: Any, gold: Any) -> bool:
    """Whether ``answer`` matches ``gold``. A numeric gold is compared with the first number in
    the answer (relative tolerance 1e-4, so 3250 matches "3250.0 m"); any other gold must equal the
    answer after case, spaces, quotes and a final full stop are normalised away."""
    answer, gold = str(answer), str(gold)
    want = _number(gold) if _NUMBER.fullmatch(gold.strip().replace(",", "")) else None
    if want is not None:
        got = _number(answer)
        return got is not None and math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-6)
    return _norm(answer) == _norm(gold)


def _observed(value: Any, target: str) -> bool:
    """Whether a tool's returned ``value`` shows ``target`` (a number equal to it, or a text
    containing it)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return answers_match(str(value), target)
    return _norm(target) in _norm(str(value))


# ============================================================================ the reply's language


def step_regex(registry: ToolRegistry, answer_chars: int = 30) -> str:
    """The language of one agent reply, for :func:`utils.constrained.compile_regex`: a well-formed
    call to one of ``registry``'s tools (:func:`utils.tools.tool_call_regex`) or ``Answer: `` and
    1 to ``answer_chars`` characters on one line."""
    check_positive_int("answer_chars", answer_chars)
    return f"{tool_call_regex(registry)}|Answer: [^\\n<]{{1,{answer_chars}}}"


# ============================================================================ the loop


def _words(text: str) -> int:
    return len(text.split())


def step_runs(generate: Generate, runs: list[AgentRun], active: list[int], budget: list[int],
              registry: ToolRegistry, count: Callable[[str], int],
              progress: Callable | None = None) -> None:
    """The loop itself: think (one model reply), call, observe, or answer. Steps the runs whose
    indexes are in ``active`` in lock step -- one batched ``generate`` call per round -- until
    each has answered or written ``budget[i]`` replies; updates the runs in place."""
    rounds = range(max((budget[i] - len(runs[i].steps) for i in active), default=0))
    for _ in (progress(rounds) if progress else rounds):
        if not active:
            break
        start = time.perf_counter()
        replies = generate([runs[i].chat for i in active])
        if len(replies) != len(active):
            raise ValueError(f"generate returned {len(replies)} replies for {len(active)} chats")
        share = (time.perf_counter() - start) / len(active)
        still = []
        for i, reply in zip(active, replies):
            run = runs[i]
            run.model_calls += 1
            run.generated_tokens += count(reply)
            run.seconds += share
            run.chat.append({"role": "assistant", "content": reply})
            try:
                call = parse_tool_call(reply)
            except ToolCallError as err:  # a malformed call: its error goes back to the model
                run.steps.append(AgentStep(reply, error=str(err)))
                run.chat.append(tool_message(ToolResult("", False, error=str(err))))
                call = err
            if isinstance(call, ToolCall):
                result = run_tool(registry, call)
                run.steps.append(AgentStep(reply, call=call, result=result))
                run.chat.append(tool_message(result))
            elif call is None:  # no call: the final answer
                run.steps.append(AgentStep(reply))
                run.answer, run.stop = extract_answer(reply), "answer"
                continue
            if len(run.steps) >= budget[i]:
                run.stop = "budget"
            else:
                still.append(i)
        active = still


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def run_agents(generate: Generate, tasks: Sequence[AgentTask], registry: ToolRegistry,
               prompt: Chat, max_steps: int = 3, count_tokens: Callable[[str], int] | None = None,
               progress: Callable | None = None) -> list[AgentRun]:
    """Run the agent loop on every task, in lock step: one ``generate`` call per step for all runs
    still going. Each run's chat is ``prompt`` (system message, examples) plus the task's question
    as a user message.

    Per reply: a tool call is run (:func:`utils.tools.run_tool`) and its result appended as a tool
    message; a malformed call gets its error back the same way; anything else is the final answer
    (:func:`extract_answer`, ``stop="answer"``). A run still calling tools after ``max_steps``
    replies stops with ``stop="budget"`` and no answer. ``count_tokens`` counts a reply's tokens
    (default: its words); ``progress`` wraps the step loop (e.g. :func:`utils.book.progress`).
    """
    check_positive_int("max_steps", max_steps)
    if not isinstance(prompt, list) or not all(isinstance(m, dict) for m in prompt):
        raise TypeError("prompt must be a list of {'role', 'content'} messages (may be empty)")
    runs = [AgentRun(task, [*map(dict, prompt), {"role": "user", "content": task.question}])
            for task in tasks]
    step_runs(generate, runs, list(range(len(runs))), [max_steps] * len(runs), registry,
             count_tokens or _words, progress)
    return runs


def reflect(generate: Generate, runs: Sequence[AgentRun], registry: ToolRegistry,
            checker: Checker, max_reflections: int = 1,
            count_tokens: Callable[[str], int] | None = None,
            progress: Callable | None = None) -> list[AgentRun]:
    """Reflection after the agent answered: copies of ``runs`` in which each answer is shown to
    ``checker``; feedback is appended as a user message and the run continues for
    :data:`REFLECTION_STEPS` more replies (:func:`run_agents`' loop), up to ``max_reflections``
    times. Runs that stopped on their budget, and answers the checker accepts, stay as they were.
    The checker's own cost (:class:`Check`) is added to each run's."""
    _check_count("max_reflections", max_reflections, 0)
    runs, accepted = [copy.deepcopy(run) for run in runs], set()
    for _ in range(max_reflections):
        answered = [i for i, run in enumerate(runs) if run.stop == "answer" and i not in accepted]
        if not answered:
            break
        checks = checker([runs[i] for i in answered])
        if len(checks) != len(answered):
            raise ValueError(f"the checker returned {len(checks)} checks for {len(answered)} runs")
        active = []
        for i, check in zip(answered, checks):
            run = runs[i]
            run.model_calls += check.model_calls
            run.generated_tokens += check.tokens
            if check.feedback is None:
                accepted.add(i)
                continue
            run.steps[-1].feedback = check.feedback
            run.chat.append({"role": "user", "content": check.feedback})
            run.reflections += 1
            run.answer, run.stop = None, ""
            active.append(i)
        budget = [len(run.steps) + REFLECTION_STEPS for run in runs]
        step_runs(generate, runs, active, budget, registry, count_tokens or _words, progress)
    return runs


# ============================================================================ checkers


def _numbers(value: Any) -> set[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {float(value)}
    if isinstance(value, dict):
        return set().union(*map(_numbers, value.values())) if value else set()
    return {float(x) for x in _NUMBER.findall(str(value).replace(",", ""))}


def grounded_checker(runs: list[AgentRun]) -> list[Check]:
    """An external checker that never sees the gold answer, only the task and the transcript. It
    sends feedback when (1) the run used no tool, (2) a number in the task was never passed to a
    tool (a step left out), or (3) the answer shows no value a tool returned (:func:`answers_match`
    for numbers, containment for text); otherwise it accepts."""
    checks = []
    for run in runs:
        observations, answer = run.observations, run.answer or ""
        used = set().union(*(_numbers(c.arguments) for c in run.calls)) if run.calls else set()
        missing = sorted(_numbers(run.task.question) - used)
        if not observations:
            feedback = "You answered without using a tool. Use a tool to get the result."
        elif missing:
            feedback = (f"You have not used {missing[0]:g} from the task yet. Call a tool with "
                        "it.")
        elif not (answer and any(_observed(value, answer) for value in observations)):
            last = ToolResult("", True, value=observations[-1]).content[:120]
            feedback = (f"Your answer {answer!r} is not a result of any tool. The last tool result "
                        f"was {last}.")
        else:
            checks.append(Check(None))
            continue
        checks.append(Check(feedback + " Then reply with Answer: and the result."))
    return checks


CRITIQUE = ("Review your previous answer and find problems with it. Is your answer correct? "
            "Reply with only yes or no.")


def self_critique_checker(generate: Generate, count_tokens: Callable[[str], int] | None = None,
                          ) -> Checker:
    """A checker that asks the model itself: the run's chat plus a request to review the answer
    (the prompt of Huang et al., 2024), replied with ``generate`` (best constrained to
    ``yes|no``). A reply starting with "no" sends feedback asking for another try. Each critique
    costs one model call and its tokens."""
    count = count_tokens or _words

    def check(runs: list[AgentRun]) -> list[Check]:
        replies = generate([[*run.chat, {"role": "user", "content": CRITIQUE}] for run in runs])
        return [Check("You said your answer has problems. Solve the task again, then reply with "
                      "Answer: and the result." if reply.strip().lower().startswith("no")
                      else None, 1, count(reply)) for reply in replies]

    return check


# ============================================================================ failures


def classify_failure(run: AgentRun) -> str:
    """The first class of :data:`FAILURE_KINDS` that fits the run, from its transcript:

    correct answer; step budget exhausted (still calling tools when the budget ended, loops
    included); no tool call (answered without one); wrong tool (called a tool the task does not
    need); bad arguments (a malformed call or a tool error); ignored observation (a tool returned
    the gold answer, but the final answer differs); bad arguments again (valid calls that never
    produced one of the task's checkpoints); otherwise wrong final answer (the path was right up
    to the last checkpoint, the answer was not).
    """
    task = run.task
    if run.correct:
        return "correct"
    if run.stop == "budget":
        return "step budget exhausted"
    acted = [s for s in run.steps if s.call is not None or s.error is not None]
    if not acted:
        return "no tool call"
    if any(s.call is not None and s.call.name not in task.tools for s in acted):
        return "wrong tool"
    if any(s.error is not None or not s.result.ok for s in acted):
        return "bad arguments"
    observations = run.observations
    if any(_observed(value, task.answer) for value in observations):
        return "ignored observation"
    if not all(any(_observed(v, c) for v in observations) for c in task.checkpoints):
        return "bad arguments"
    return "wrong final answer"
