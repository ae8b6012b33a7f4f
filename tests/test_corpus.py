"""Corpus: the measured speedrun mix, exact R1-Zero renders, train-split only, cold-start SFT examples."""

import re
from collections import Counter

import pytest

from nanor1.common import NanoR1Error
from nanor1.corpus import CorpusMix, pretrain_documents, sft_examples, tokenizer_training_texts
from nanor1.rewards import accuracy_reward, format_reward
from nanor1.tasks import get_task
from nanor1.tasks.base import Split, make_problem, split_of
from nanor1.templates import Template, extract_answer_strict, render_prompt

TASK = get_task("chain_sum")
PROMPT_HEAD = render_prompt("", Template.R1_ZERO).split("User:")[0]


def _kind(doc: str) -> str:
    if doc.startswith(PROMPT_HEAD):
        return "tagged_reasoning" if "<think> " in doc.split("Assistant:")[1] else "tagged_direct"
    if re.fullmatch(r"Q: [\d+]+\nA: \d+", doc):
        return "direct"
    if re.fullmatch(r"(\d+\+\d+=\d+\n?)+", doc):
        return "facts"
    return "worked"


def _question(doc: str) -> str | None:
    m = re.search(r"(?:Q: |Problem: |User: |^)(\d(?:\+\d)+)", doc)
    return m.group(1) if m else None


def test_default_mix_counts_are_exact():
    docs = pretrain_documents(TASK, 1000, seed=0)
    assert Counter(map(_kind, docs)) == {"direct": 300, "worked": 250, "tagged_direct": 150,
                                         "tagged_reasoning": 50, "facts": 250}
    custom = pretrain_documents(TASK, 10, 0, CorpusMix(direct=1, worked=0, tagged_direct=1, tagged_reasoning=0,
                                                       facts=0))
    assert Counter(map(_kind, custom)) == {"direct": 5, "tagged_direct": 5}


def test_tagged_documents_are_exact_r1_zero_renders_that_earn_full_reward():
    for doc in pretrain_documents(TASK, 400, seed=1):
        kind = _kind(doc)
        if not kind.startswith("tagged"):
            continue
        q = _question(doc.split("User: ")[1])
        prompt = render_prompt(q, Template.R1_ZERO)
        answer = str(sum(int(x) for x in q.split("+")))
        problem = make_problem("chain_sum", q, answer)
        expected = f" <answer>{answer}</answer>" if kind == "tagged_direct" else \
            f" <think> {TASK.worked_solution(problem)} </think> <answer>{answer}</answer>"
        assert doc == prompt + expected
        completion = doc[len(prompt):]
        if kind == "tagged_reasoning":    # what GRPO reinforces must score 1 under the real rewards
            assert format_reward(completion) == 1.0 and accuracy_reward(completion, problem, TASK) == 1.0
        else:
            assert extract_answer_strict(completion, require_think=False) == answer


def test_documents_are_correct_and_use_only_train_problems():
    docs = pretrain_documents(TASK, 2000, seed=2)
    eval_questions = {p.question for p in TASK.problems("eval", 300)}
    for doc in docs:
        if _kind(doc) == "facts":
            for a, b, c in re.findall(r"(\d+)\+(\d+)=(\d+)", doc):
                assert int(a) + int(b) == int(c)
            continue
        q = _question(doc.split("User: ")[-1])
        assert q is not None and split_of(q, TASK.eval_fraction) is Split.TRAIN and q not in eval_questions
        assert re.findall(r"\d+", doc)[-1] == str(sum(int(x) for x in q.split("+")))   # the final answer


def test_corpus_is_seeded():
    assert pretrain_documents(TASK, 50, 3) == pretrain_documents(TASK, 50, 3)
    assert pretrain_documents(TASK, 50, 3) != pretrain_documents(TASK, 50, 4)
    with pytest.raises(NanoR1Error, match="shares"):
        pretrain_documents(TASK, 10, 0, CorpusMix(direct=-1))


def test_tasks_without_worked_solutions_fold_their_shares():
    task = get_task("rg:basic_arithmetic")
    docs = pretrain_documents(task, 100, 0)
    tagged = [d for d in docs if d.startswith(PROMPT_HEAD)]
    assert len(tagged) == 20 and all("<think>" not in d.split("Assistant:")[1] for d in tagged)
    assert sum(d.startswith("Q: ") for d in docs) == 80
    with pytest.raises(NanoR1Error, match="no worked solutions"):
        sft_examples(task, 2, 0)


def test_sft_examples_are_chat_messages_with_correct_tagged_answers():
    examples = sft_examples(get_task("multiplication"), 20, seed=0)
    task = get_task("multiplication")
    for ex in examples:
        user, assistant = ex["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        a, b = map(int, user["content"].split("*"))
        assert format_reward(assistant["content"]) == 1.0
        assert extract_answer_strict(assistant["content"]) == str(a * b)
        assert split_of(user["content"], task.eval_fraction) is Split.TRAIN


def test_tokenizer_training_texts_include_chat_renders():
    texts = tokenizer_training_texts(TASK, 100, 0)
    assert len(texts) == 110 and sum(t.startswith("<|user|>") and t.endswith("<|eos|>") for t in texts) == 10


def test_task_options_reach_the_pretraining_corpus_and_the_cold_start():
    """pretrain and sft take task_options like grpo and eval do, so a speedrun on `chain_sum` with 3 terms
    pretrains, cold-starts, trains and evaluates on 3 terms everywhere."""
    from nanor1.pretrain import PretrainConfig, corpus_documents
    from nanor1.sft import SFTConfig, load_examples
    docs = corpus_documents(PretrainConfig(n_docs=40, task_options={"terms": 3}))
    questions = [_question(d) for d in docs if _kind(d) != "facts"]
    assert questions and all(q.count("+") == 2 for q in questions)
    examples = load_examples(SFTConfig(model="unused", n_examples=5, task_options={"terms": 3}))
    assert all(_question(ex["messages"][0]["content"]).count("+") == 2 for ex in examples)
