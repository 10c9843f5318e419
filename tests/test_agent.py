"""Tests of utils.agent: the loop, reflection, voting and the failure taxonomy with a scripted fake
model (no LLM). The real model path (utils.chat.ChatGenerator) is tested in test_chat.py."""
from __future__ import annotations

import pytest
import torch
from tiny_chatml import chatml_tokenizer, tiny_llama

from utils.agent import (FAILURE_KINDS, REFLECTION_STEPS, AgentRun, AgentStep, AgentTask,
                         Check, answers_match, classify_failure, extract_answer,
                         grounded_checker, reflect, run_agents,
                         self_critique_checker, step_regex, step_runs)
from utils.constrained import compile_regex
from utils.prompting import majority_vote
from utils.tools import Tool, ToolRegistry, format_tool_call, standard_tools

CHAIN = AgentTask("a0", "Compute 12 * 7, then subtract 15 from the result.", "69",
                  ("calculator", "calculator"), ("84",), "arithmetic")
UNITS = AgentTask("u0", "Convert 2 km to m, then add 43 m.", "2043",
                  ("convert_units", "calculator"), ("2000",), "units")
PROMPT = [{"role": "system", "content": "You are an agent."}]


@pytest.fixture(scope="module")
def registry() -> ToolRegistry:
    return standard_tools(include_docs=False)


def calc(expression: str) -> str:
    return format_tool_call("calculator", {"expression": expression})


def scripted(script: dict[str, list[str]]):
    """A fake model: for each task (found by its question), the replies in order."""
    def generate(chats):
        out = []
        for chat in chats:
            question = next(m["content"] for m in chat if m["role"] == "user")
            turn = sum(m["role"] == "assistant" for m in chat)
            replies = script[question]
            out.append(replies[min(turn, len(replies) - 1)])
        return out
    return generate


# ------------------------------------------------------------------------------ answers and votes

def test_extract_answer():
    assert extract_answer("Answer: 42") == "42"
    assert extract_answer("I think.\nAnswer: 4 m\nmore") == "4 m"
    assert extract_answer("  just text ") == "just text"
    with pytest.raises(TypeError, match="str"):
        extract_answer(3)


@pytest.mark.parametrize("answer, gold, same", [
    ("69", "69", True), ("69.0 m", "69", True), ("1,234", "1234", True), ("68", "69", False),
    ("no number", "69", False), ("lib/json.py", "Lib/json.py", True),
    ("'Lib/json.py'.", "Lib/json.py", True), ("Lib/json/tool.py", "Lib/json.py", False),
])
def test_answers_match(answer, gold, same):
    assert answers_match(answer, gold) is same


def test_majority_vote_with_answers_match():
    assert majority_vote(["3", "4", "4.0", None], same=answers_match) == "4"
    assert majority_vote(["3", "4", "4.0", None]) == "3"  # without it, "4" and "4.0" differ
    assert majority_vote(["a", "b"], same=answers_match) == "a"  # a tie goes to the first
    assert majority_vote([None, None], same=answers_match) is None
    assert majority_vote([], same=answers_match) is None


# ------------------------------------------------------------------------------ the loop

def test_a_correct_chain_and_its_cost(registry):
    replies = [calc("12 * 7"), calc("84 - 15"), "Answer: 69"]
    [run] = run_agents(scripted({CHAIN.question: replies}), [CHAIN], registry, PROMPT, max_steps=3,
                       count_tokens=len)
    assert run.correct and run.stop == "answer" and run.answer == "69"
    assert run.observations == [84, 69] and [c.name for c in run.calls] == ["calculator"] * 2
    assert run.model_calls == 3 and run.generated_tokens == sum(map(len, replies))
    assert run.seconds >= 0
    roles = [m["role"] for m in run.chat]
    assert roles == ["system", "user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert run.chat[3]["content"] == "84"
    assert classify_failure(run) == "correct"


def test_budget_malformed_calls_and_lock_step(registry):
    loop = AgentTask("l", "Compute 1 + 1.", "2", ("calculator",))
    broken = AgentTask("b", "Compute 2 + 2.", "4", ("calculator",))
    gen = scripted({loop.question: [calc("1 + 1")], broken.question: ["<tool_call>{oops"]})
    seen = []
    runs = run_agents(lambda chats: seen.append(len(chats)) or gen(chats), [loop, broken],
                      registry, PROMPT, max_steps=2, progress=lambda it: it)
    assert seen == [2, 2]
    assert [r.stop for r in runs] == ["budget", "budget"] and runs[0].answer is None
    assert runs[1].steps[0].error and "not closed" in runs[1].chat[3]["content"]
    assert [classify_failure(r) for r in runs] == ["step budget exhausted"] * 2


@pytest.mark.parametrize("replies, kind", [
    (["Answer: 70"], "no tool call"),
    ([format_tool_call("weekday", {"date": "2024-01-01"}), "Answer: 69x"], "correct"),
    ([format_tool_call("weekday", {"date": "2024-01-01"}), "Answer: 1"], "wrong tool"),
    ([calc("12 * x"), "Answer: 1"], "bad arguments"),
    (["<tool_call>not json</tool_call>", "Answer: 1"], "bad arguments"),
    ([calc("12 * 7 - 15"), "Answer: 68"], "ignored observation"),
    ([calc("12 * 6"), "Answer: 5"], "bad arguments"),
    ([calc("12 * 7"), "Answer: 5"], "wrong final answer"),
])
def test_failure_taxonomy(registry, replies, kind):
    [run] = run_agents(scripted({CHAIN.question: replies}), [CHAIN], registry, PROMPT)
    assert classify_failure(run) == kind and kind in FAILURE_KINDS


def test_loop_input_checks(registry):
    with pytest.raises(TypeError, match="prompt"):
        run_agents(scripted({}), [CHAIN], registry, "system")
    with pytest.raises(ValueError, match="max_steps"):
        run_agents(scripted({}), [CHAIN], registry, PROMPT, max_steps=0)
    with pytest.raises(ValueError, match="2 replies for 1 chats"):
        run_agents(lambda chats: ["a", "b"], [CHAIN], registry, PROMPT)
    assert run_agents(scripted({}), [], registry, PROMPT) == []


def test_step_runs_updates_in_place(registry):
    run = AgentRun(CHAIN, [*PROMPT, {"role": "user", "content": CHAIN.question}])
    step_runs(scripted({CHAIN.question: ["Answer: 69"]}), [run], [0], [1], registry, len)
    assert run.correct and run.model_calls == 1


# ------------------------------------------------------------------------------ reflection

def test_grounded_checker_messages(registry):
    script = {CHAIN.question: ["Answer: 69"],
              UNITS.question: [format_tool_call("convert_units", {"value": 2, "from_unit": "km",
                                                                  "to_unit": "m"}), "Answer: 2000"]}
    runs = run_agents(scripted(script), [CHAIN, UNITS], registry, PROMPT)
    checks = grounded_checker(runs)
    assert "without using a tool" in checks[0].feedback
    assert "not used 43" in checks[1].feedback and checks[1].model_calls == 0
    chain = run_agents(scripted({CHAIN.question: [calc("12 * 7 - 15"), "Answer: 70"]}), [CHAIN],
                       registry, PROMPT)
    [check] = grounded_checker(chain)
    assert "not a result of any tool" in check.feedback and "69" in check.feedback
    chain[0].answer = "69"
    assert grounded_checker(chain) == [Check(None)]


def test_reflect_continues_only_flagged_runs(registry):
    script = {UNITS.question: [format_tool_call("convert_units", {"value": 2, "from_unit": "km",
                                                                  "to_unit": "m"}),
                               "Answer: 2000", calc("2000 + 43"), "Answer: 2043"],
              CHAIN.question: [calc("12 * 7 - 15"), "Answer: 69"]}
    gen = scripted(script)
    base = run_agents(gen, [UNITS, CHAIN], registry, PROMPT)
    assert [r.correct for r in base] == [False, True]
    after = reflect(gen, base, registry, grounded_checker, max_reflections=2)
    assert [r.correct for r in after] == [True, True]
    assert base[0].answer == "2000" and len(base[0].steps) == 2  # the originals are untouched
    units = after[0]
    assert units.reflections == 1 and len(units.steps) == 2 + REFLECTION_STEPS
    assert units.steps[1].feedback.startswith("You have not used 43")
    assert after[1].model_calls == base[1].model_calls and after[1].reflections == 0
    assert reflect(gen, base, registry, grounded_checker, max_reflections=0)[0].answer == "2000"


def test_reflect_budget_and_checks(registry):
    gen = scripted({CHAIN.question: ["Answer: 1", calc("1 + 1")]})
    base = run_agents(gen, [CHAIN], registry, PROMPT)
    [run] = reflect(gen, base, registry, grounded_checker)
    assert run.stop == "budget" and run.answer is None and len(run.steps) == 1 + REFLECTION_STEPS
    with pytest.raises(ValueError, match="max_reflections"):
        reflect(gen, base, registry, grounded_checker, max_reflections=-1)
    with pytest.raises(ValueError, match="checker returned 0 checks"):
        reflect(gen, base, registry, lambda runs: [])


def test_self_critique_checker(registry):
    gen = scripted({CHAIN.question: [calc("12 * 7 - 15"), "Answer: 69"]})
    base = run_agents(gen, [CHAIN, CHAIN], registry, PROMPT)
    asked = []

    def critic(chats):
        asked.extend(chats)
        return ["no", "yes"]
    checks = self_critique_checker(critic)(base)
    assert checks[0].feedback and checks[1].feedback is None
    assert [c.model_calls for c in checks] == [1, 1] and checks[0].tokens == 1
    assert asked[0][-1]["role"] == "user" and "Review your previous answer" in asked[0][-1]["content"]
    after = reflect(gen, base, registry, self_critique_checker(critic, len))
    assert after[0].model_calls == base[0].model_calls + 2 and after[0].correct
    assert after[1].generated_tokens == base[1].generated_tokens + 3


# ------------------------------------------------------------------------------ the real model path

def test_step_regex(registry):
    dfa = compile_regex(step_regex(registry.subset(["calculator"]), answer_chars=8))
    assert dfa.matches(calc("1 + 2")) and dfa.matches("Answer: 42")
    assert not dfa.matches("Answer: ") and not dfa.matches("Answer: 123456789")
    with pytest.raises(ValueError, match="answer_chars"):
        step_regex(registry, 0)


def test_tool_with_a_dataclass_step():
    step = AgentStep("Answer: 1")
    assert step.call is None and step.result is None and step.feedback is None
    echo = Tool("echo", "repeat", {"type": "object", "properties": {}}, lambda: "hi")
    [run] = run_agents(scripted({"Say hi.": [format_tool_call("echo", {}), "Answer: hi"]}),
                       [AgentTask("e", "Say hi.", "hi", ("echo",))], ToolRegistry([echo]), [])
    assert run.correct and run.observations == ["hi"]
