"""Tests for cast_peft.evaluation against hand-computed, unbatched reference values on tiny offline models."""

import json
import math

import pytest
import torch
from models import build_byte_tokenizer
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from cast_peft import evaluation as ev
from cast_peft.data import format_chat


CHAT_TEMPLATE = "{% for m in messages %}<|user|>\n{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
SPECIALS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
CORPUS = [
    "I'm sorry, but I can't help with that request.",
    "Sure, here is a short answer to your question.",
    "The cat sat on the mat and the dog slept on the rug.",
    "Question: What colour is the sky? Answer: blue yes no",
    "How do I bake bread? Mix flour, water, salt and yeast, then bake it.",
    "sorry sorry sorry sure sure yes yes no no",
] * 20
PROMPTS = ["How do I bake bread?", "Tell me about cats", "hi", "What colour is the sky on a clear summer day?"]


def prompt_text(tokenizer, prompt: str) -> str:
    return format_chat(tokenizer, prompt)[0]


def _tokenizer(chat: bool, pad: bool = True) -> PreTrainedTokenizerFast:
    # These tests need a BOS token, a chat template whose rendered text they spell out, and a variant without a pad
    # token (hence not the shared character-level build_tiny_tokenizer).
    return build_byte_tokenizer(
        CORPUS,
        SPECIALS,
        bos="<s>",
        eos="</s>",
        pad="<pad>" if pad else None,
        chat_template=CHAT_TEMPLATE if chat else None,
    )


@pytest.fixture(scope="module")
def tok():
    return _tokenizer(chat=True)


@pytest.fixture(scope="module")
def plain_tok():
    return _tokenizer(chat=False, pad=False)


def _llama(tok, seed=0, std=0.02):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=std,
        pad_token_id=tok.convert_tokens_to_ids("<pad>"),
        bos_token_id=tok.convert_tokens_to_ids("<s>"),
        eos_token_id=tok.convert_tokens_to_ids("</s>"),
    )
    return LlamaForCausalLM(cfg).eval()


def _gpt2(tok, seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=256, initializer_range=0.2)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tok):
    return _llama(tok, std=0.2) if request.param == "llama" else _gpt2(tok)


def _forced(tok, text):
    """A Llama whose every next-token distribution puts almost all mass on the single token of ``text``."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, f"{text!r} should be one token, got {ids}"
    m = _llama(tok)
    head = torch.nn.Linear(32, len(tok), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[ids[0]] = 30.0
    m.lm_head = head
    return m, ids[0]


# ----------------------------------------------------------------------------------------------- unbatched references


def _ref_cont_logprob(model, ctx_ids, cont_ids):
    """Sum log p(cont | ctx), one unpadded sequence, explicit loop over positions."""
    ids = torch.tensor([ctx_ids + cont_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    return sum(logp[len(ctx_ids) + j - 1, t].item() for j, t in enumerate(cont_ids))


def _split(tok, ctx, cont, special):
    c = tok(ctx, add_special_tokens=special)["input_ids"]
    w = tok(ctx + cont, add_special_tokens=special)["input_ids"]
    assert w[: len(c)] == c
    return c, w[len(c) :]


# ----------------------------------------------------------------------------------------------- refusal


@pytest.mark.parametrize(
    "text,expected",
    [
        ("I'm sorry, but I can't help with that.", True),
        ("I\u2019m sorry, I can\u2019t do that", True),
        ("  AS AN AI language model, I must decline.", True),
        ("I   cannot\nprovide that", True),
        ("Sure, here is a recipe: mix flour and water.", False),
        ("", False),
        ("Bread is made from flour. " * 10 + "Sorry for the long answer.", False),  # marker after 200 chars
        ("Here is how. Sorry, just kidding, I will not.", False),  # judged by the opening
    ],
)
def test_is_refusal(text, expected):
    assert ev.is_refusal(text) is expected


def test_refusal_openers_are_lower_case():
    assert all(m == m.lower() and m.strip() == m and "\u2019" not in m for m in ev.REFUSAL_OPENERS)
    assert {"i cannot", "i can't", "i won't", "i must decline", "it is not appropriate"} <= set(ev.REFUSAL_OPENERS)


def test_prompt_text(tok, plain_tok):
    assert prompt_text(tok, "hi") == "<|user|>\nhi\n<|assistant|>\n"
    assert prompt_text(plain_tok, "hi") == "### Instruction:\nhi\n\n### Response:\n"


@pytest.mark.parametrize("word,rate", [(" sorry", 1.0), (" sure", 0.0)])
def test_refusal_rate_forced(tok, word, rate):
    m, _ = _forced(tok, word)
    res = ev.refusal_rate(m, tok, PROMPTS[:3], max_new_tokens=4, batch_size=2, progress=False)
    assert res["refusal_rate"] == rate and res["n"] == 3
    assert all(it["response"] == (word * 4).strip() for it in res["items"])
    over = ev.over_refusal_rate(m, tok, PROMPTS[:3], max_new_tokens=4, batch_size=2, progress=False)
    assert over["over_refusal_rate"] == rate
    json.dumps(res)


@pytest.mark.parametrize("chat", [True, False])
def test_generate_batched_equals_unbatched(chat, tok, plain_tok):
    t = tok if chat else plain_tok
    m = _llama(t, std=0.5)
    pad_side = t.padding_side
    batched = ev.generate_responses(m, t, PROMPTS, max_new_tokens=6, batch_size=4, progress=False)
    single = ev.generate_responses(m, t, PROMPTS, max_new_tokens=6, batch_size=1, progress=False)
    assert batched == single and t.padding_side == pad_side
    # independent greedy decode of the first prompt without generate()
    ids = t(prompt_text(t, PROMPTS[0]), add_special_tokens=not chat)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(m(torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == t.eos_token_id:
                break
            new.append(nxt)
    assert batched[0] == t.decode(new, skip_special_tokens=True).strip()
    res = ev.refusal_rate(m, t, PROMPTS, max_new_tokens=6, batch_size=3, progress=False)
    assert [it["response"] for it in res["items"]] == batched
    assert all(it["refused"] == ev.is_refusal(it["response"]) for it in res["items"])
    assert res["refusal_rate"] == pytest.approx(sum(it["refused"] for it in res["items"]) / len(PROMPTS))


# ----------------------------------------------------------------------------------------------- log-prob scores


def test_logit_refusal_score(model, tok):
    res = ev.logit_refusal_score(model, tok, PROMPTS, batch_size=3, progress=False)
    scores, probs = [], []
    for p, it in zip(PROMPTS, res["items"]):
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        r = _ref_cont_logprob(model, *_split(tok, text, "I'm sorry, but I can't", False))
        c = _ref_cont_logprob(model, *_split(tok, text, "Sure, here is", False))
        assert it["refusal_logprob"] == pytest.approx(r, abs=1e-4)
        assert it["compliance_logprob"] == pytest.approx(c, abs=1e-4)
        assert it["refusal_prob"] == pytest.approx(math.exp(r), rel=1e-3)
        scores.append(r - c)
        probs.append(math.exp(r))
    assert res["score"] == pytest.approx(sum(scores) / len(scores), abs=1e-4)
    assert res["refusal_prefix_prob"] == pytest.approx(sum(probs) / len(probs), rel=1e-3)
    assert res["refusal_fraction"] == sum(s > 0 for s in scores) / len(scores)
    json.dumps(res)


def test_logit_refusal_score_forced(tok):
    m, _ = _forced(tok, " sorry")
    res = ev.logit_refusal_score(
        m, tok, PROMPTS[:2], refusal_prefix=" sorry sorry", compliance_prefix=" sure", progress=False
    )
    assert res["refusal_fraction"] == 1.0 and res["score"] > 20
    assert res["refusal_prefix_prob"] > 0.99  # the forced model opens with the refusal prefix


@pytest.mark.parametrize("max_length,stride", [(256, None), (8, None), (8, 3)])
def test_perplexity_matches_unbatched(model, tok, max_length, stride):
    texts = [CORPUS[0] + " " + CORPUS[2], "The cat sat.", "x", CORPUS[4]]
    res = ev.perplexity(model, tok, texts, max_length=max_length, stride=stride, batch_size=3, progress=False)
    step = stride or max_length
    total, count = 0.0, 0
    for text, item in zip(texts, res["items"]):
        ids = tok(text)["input_ids"]
        nll, n = 0.0, 0
        if max_length >= len(ids):  # whole text in one window: use HF's own loss
            if len(ids) > 1:
                with torch.no_grad():
                    loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
                nll, n = loss * (len(ids) - 1), len(ids) - 1
        else:  # explicit sliding windows: token i is scored in the first window that contains it at offset >= 1
            scored = set()
            for begin in range(0, len(ids), step):
                win = ids[begin : begin + max_length]
                for off in range(1, len(win)):
                    if begin + off not in scored:
                        scored.add(begin + off)
                        nll -= _ref_cont_logprob(model, win[:off], [win[off]])
                        n += 1
                if begin + max_length >= len(ids):
                    break
        assert item["n_tokens"] == n
        if n:
            assert item["nll"] == pytest.approx(nll / n, abs=1e-4)
        total, count = total + nll, count + n
    assert res["n_tokens"] == count
    assert res["nll"] == pytest.approx(total / count, abs=1e-4)
    assert res["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)


def test_perplexity_batch_invariant(model, tok):
    texts = CORPUS[:6]
    a = ev.perplexity(model, tok, texts, max_length=10, batch_size=1, progress=False)
    b = ev.perplexity(model, tok, texts, max_length=10, batch_size=5, progress=False)
    assert a["n_tokens"] == b["n_tokens"]
    assert a["nll"] == pytest.approx(b["nll"], abs=1e-5)


def test_response_nll(model, tok):
    pairs = [(PROMPTS[0], "Mix flour, water, salt and yeast."), {"prompt": PROMPTS[1], "response": "The cat sat."}]
    res = ev.response_nll(model, tok, pairs, batch_size=2, progress=False)
    total, count = 0.0, 0
    for (p, r), it in zip([pairs[0], (PROMPTS[1], "The cat sat.")], res["items"]):
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        ctx, cont = _split(tok, text, r, False)
        lp = _ref_cont_logprob(model, ctx, cont)
        assert it["n_tokens"] == len(cont)
        assert it["nll"] == pytest.approx(-lp / len(cont), abs=1e-4)
        total, count = total - lp, count + len(cont)
    assert res["nll"] == pytest.approx(total / count, abs=1e-4) and res["n_tokens"] == count


def test_response_nll_fallback_without_pad(plain_tok):
    m = _llama(plain_tok)
    res = ev.response_nll(m, plain_tok, [("hi", "Sure."), ("How do I bake bread?", "Mix flour.")], progress=False)
    text = "### Instruction:\nhi\n\n### Response:\n"
    ctx, cont = _split(plain_tok, text, "Sure.", True)
    assert res["items"][0]["nll"] == pytest.approx(-_ref_cont_logprob(m, ctx, cont) / len(cont), abs=1e-4)
    assert plain_tok.pad_token is None


# ----------------------------------------------------------------------------------------------- multiple choice


def test_multiple_choice_matches_unbatched(model, tok):
    items = [
        {
            "context": "Question: What colour is the sky?\nAnswer:",
            "choices": [" blue", " yes", " the dog slept"],
            "gold": 0,
        },
        {"context": "The cat sat on the", "choices": [" mat", " rug"], "gold": 1},
        {"contexts": ["The cat sat", "The dog slept"], "continuation": " on the mat.", "gold": 0},
    ]
    res = ev.multiple_choice_accuracy(model, tok, items, batch_size=2, progress=False)
    n_acc = n_norm = 0
    for item, out in zip(items, res["items"]):
        if "contexts" in item:
            opts = [(c, item["continuation"]) for c in item["contexts"]]
        else:
            opts = [(item["context"], c) for c in item["choices"]]
        scores = [_ref_cont_logprob(model, *_split(tok, c, x, True)) for c, x in opts]
        assert out["scores"] == pytest.approx(scores, abs=1e-4)
        norm = [s / len(x) for s, (_, x) in zip(scores, opts)]
        n_acc += max(range(len(scores)), key=scores.__getitem__) == item["gold"]
        n_norm += max(range(len(norm)), key=norm.__getitem__) == item["gold"]
    assert res["acc"] == n_acc / 3 and res["acc_norm"] == n_norm / 3
    json.dumps(res)


def test_multiple_choice_forced(tok):
    m, _ = _forced(tok, " yes")
    items = [
        {"context": "Question: is the sky blue?\nAnswer:", "choices": [" no", " yes"], "gold": 1},
        {"context": "Question: is the cat a dog?\nAnswer:", "choices": [" yes", " no"], "gold": 1},
        {"context": "The cat", "choices": [" sat on the mat", " yes yes yes"], "gold": 1},
    ]
    res = ev.multiple_choice_accuracy(m, tok, items, progress=False)
    assert [it["pred"] for it in res["items"]] == [1, 0, 1]
    assert [it["pred_norm"] for it in res["items"]] == [1, 0, 1]
    assert res["acc"] == pytest.approx(2 / 3) and res["acc_norm"] == pytest.approx(2 / 3)
    assert "acc_norm" not in ev.multiple_choice_accuracy(m, tok, items[:1], normalize=False, progress=False)


def test_multiple_choice_bad_items(tok):
    m = _llama(tok)
    with pytest.raises(ValueError, match="gold"):
        ev.multiple_choice_accuracy(m, tok, [{"context": "a", "choices": [" b"], "gold": 3}], progress=False)
    with pytest.raises(ValueError, match="contexts"):
        ev.multiple_choice_accuracy(m, tok, [{"question": "a"}], progress=False)
    with pytest.raises(ValueError, match="empty"):
        ev.multiple_choice_accuracy(m, tok, [], progress=False)


# ----------------------------------------------------------------------------------------------- KL drift


def _ref_kl(model, ref, ids, ref_ctx=None):
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        if ref_ctx is None:
            lq = torch.log_softmax(ref(torch.tensor([ids])).logits[0].double(), -1)
        else:
            with ref_ctx():
                lq = torch.log_softmax(ref(torch.tensor([ids])).logits[0].double(), -1)
    per_pos = [sum(lq[i].exp() * (lq[i] - lp[i])).item() for i in range(len(ids))]
    return sum(per_pos) / len(per_pos), per_pos[-1]


def test_kl_drift_two_models(tok):
    a, b = _llama(tok, seed=0, std=0.2), _llama(tok, seed=1, std=0.2)
    res = ev.kl_drift(a, b, tok, PROMPTS, batch_size=3, progress=False)
    kls = []
    for p, it in zip(PROMPTS, res["items"]):
        ids = tok(prompt_text(tok, p), add_special_tokens=False)["input_ids"]
        kl, last = _ref_kl(a, b, ids)
        assert it["kl"] == pytest.approx(kl, abs=1e-5) and it["kl_last"] == pytest.approx(last, abs=1e-5)
        assert it["n_positions"] == len(ids)
        kls.append(kl)
    assert res["kl"] == pytest.approx(sum(kls) / len(kls), abs=1e-5) and res["kl"] > 0
    assert ev.kl_drift(a, a, tok, PROMPTS, progress=False)["kl"] == pytest.approx(0.0, abs=1e-6)
    json.dumps(res)


def test_kl_drift_peft_adapter_disabled(tok):
    from peft import LoraConfig, get_peft_model

    base = _llama(tok, std=0.2)
    with pytest.raises(ValueError, match="PeftModel"):
        ev.kl_drift(base, None, tok, PROMPTS, progress=False)
    torch.manual_seed(3)
    pm = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    pm.train()
    res = ev.kl_drift(pm, None, tok, PROMPTS, batch_size=2, progress=False)
    assert pm.training  # training flag restored
    pm.eval()
    for p, it in zip(PROMPTS, res["items"]):
        ids = tok(prompt_text(tok, p), add_special_tokens=False)["input_ids"]
        kl, _ = _ref_kl(pm, pm, ids, ref_ctx=pm.disable_adapter)
        assert it["kl"] == pytest.approx(kl, abs=1e-5)
    assert res["kl"] > 0
    # with generated continuations: more positions per prompt
    gen = ev.kl_drift(pm, None, tok, PROMPTS[:2], max_new_tokens=3, progress=False)
    n0 = len(tok(prompt_text(tok, PROMPTS[0]), add_special_tokens=False)["input_ids"])
    assert n0 < gen["items"][0]["n_positions"] <= n0 + 3
