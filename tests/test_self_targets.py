"""diagnose(..., utility_targets="self"): the model's own greedy answers as utility targets (issue 15, item 1).

Every expectation is computed independently: the answers with one plain ``model.generate(do_sample=False)`` call per
prompt on the chat template's rendering, the map with ``diagnose`` on batches built here by hand from those ids.
"""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
import torch
from models import build_tiny_model, build_tiny_tokenizer

from cast_peft import ConfigError, ConflictMap, DataError, DiagnosisError, SelfTargets, diagnose
from cast_peft.data import starter_set
from cast_peft.diagnosis import generate_self_targets


PROMPTS = [ex["prompt"] for ex in starter_set("utility")[:5]]
SAFETY = starter_set("safety")[:4]
EOS = 1  # the tiny models' and tokenizer's EOS ("<|end|>")


@pytest.fixture
def model():
    return build_tiny_model("llama")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def independent_answer(model, tokenizer, prompt: str, max_new_tokens: int) -> tuple[list[int], list[int]]:
    """(prompt ids, new ids up to and including the first EOS) from one unbatched, unpadded greedy generate."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    new = out[0, len(ids) :].tolist()
    return ids, new[: new.index(EOS) + 1] if EOS in new else new


def test_targets_equal_an_independent_generate_per_prompt(model, tokenizer):
    result = generate_self_targets(model, tokenizer, PROMPTS, SelfTargets(max_new_tokens=10), batch_size=3,
                                   progress=False)  # fmt: skip
    expected = [independent_answer(model, tokenizer, p, 10)[1] for p in PROMPTS]
    assert result["response_ids"] == expected
    assert result["responses"] == [tokenizer.decode([t for t in e if t != EOS], skip_special_tokens=True)
                                   for e in expected]  # fmt: skip
    assert all(e for e in expected)  # the case this test means: non-empty answers
    assert not model.training  # the fixture's mode, restored


def test_diagnose_scores_the_answers_and_records_them(model, tokenizer, tmp_path):
    cmap = diagnose(model, tokenizer, SAFETY, PROMPTS, utility_targets=SelfTargets(max_new_tokens=10),
                    batch_size=2, max_length=64, progress=False)  # fmt: skip
    # The same map from hand-made batches: prompt ids + the model's answer ids, loss on the answer only.
    utility = []
    for prompt in PROMPTS:
        ids, new = independent_answer(model, tokenizer, prompt, 10)
        utility.append({"input_ids": torch.tensor([ids + new]), "attention_mask": torch.ones(1, len(ids + new)),
                        "labels": torch.tensor([[-100] * len(ids) + new])})  # fmt: skip
    reference = diagnose(model, tokenizer, SAFETY, utility, batch_size=2, max_length=64, progress=False)
    torch.testing.assert_close(cmap.oc, reference.oc, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cmap.fs, reference.fs, rtol=1e-5, atol=1e-7)

    meta = cmap.metadata["utility_targets"]
    assert meta["source"] == "self" and meta["greedy"] is True and meta["max_new_tokens"] == 10
    assert meta["n_prompts"] == len(PROMPTS) and meta["batch_size"] == 2 and meta["cache"] is None
    assert meta["prompts_sha256"] == hashlib.sha256(json.dumps(PROMPTS, ensure_ascii=False).encode()).hexdigest()
    assert meta["model"]["config_sha256"] == cmap.metadata["model"]["config_sha256"]
    assert meta["dtype"] == "torch.float32"
    answers = [independent_answer(model, tokenizer, p, 10)[1] for p in PROMPTS]
    assert meta["stopped_at_eos"] == sum(EOS in a for a in answers)
    cmap.save(tmp_path / "map")
    assert ConflictMap.load(tmp_path / "map").metadata["utility_targets"] == meta


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([], "empty"),
        ([1, 2], "item 0 is a int"),
        (["ok", None], "item 1 is a NoneType"),
        (["ok", "  "], "item 1 is an empty prompt"),
        ([{"prompt": "hi", "response": "there"}], "has 'response'"),
        ([{"text": "hi"}], "no 'prompt' key"),
        ("one string", "not a str"),
        (None, "No utility data"),
    ],
)
def test_bad_prompts_fail_before_any_generation(model, tokenizer, data, match, monkeypatch):
    monkeypatch.setattr(model, "generate", lambda *a, **k: pytest.fail("generated before checking the prompts"))
    with pytest.raises(DataError, match=match):
        diagnose(model, tokenizer, SAFETY, data, utility_targets="self", progress=False)


def test_bad_options_and_safety_data_fail_before_any_generation(model, tokenizer, monkeypatch):
    monkeypatch.setattr(model, "generate", lambda *a, **k: pytest.fail("generated before checking the input"))
    with pytest.raises(ConfigError, match="utility_targets='mine'"):
        diagnose(model, tokenizer, SAFETY, PROMPTS, utility_targets="mine", progress=False)
    with pytest.raises(ConfigError, match="max_new_tokens=0"):
        SelfTargets(max_new_tokens=0)
    with pytest.raises(DataError, match="safety data is empty"):
        diagnose(model, tokenizer, [], PROMPTS, utility_targets="self", progress=False)
    with pytest.raises(DataError, match="needs the tokenizer"):
        diagnose(model, None, [{"input_ids": torch.ones(1, 4, dtype=torch.long)}], PROMPTS, utility_targets="self")


def test_an_answer_without_tokens_is_a_clear_error(model, tokenizer, tmp_path):
    # Make the first greedy token of prompt 0 an EOS id: its answer is empty.
    first = independent_answer(model, tokenizer, PROMPTS[0], 1)[1][0]
    model.generation_config.eos_token_id = [EOS, first]
    with pytest.raises(DiagnosisError, match=r"empty \(it emits EOS first\).*items \[0"):
        diagnose(model, tokenizer, SAFETY, PROMPTS, utility_targets=SelfTargets(max_new_tokens=4, cache_dir=tmp_path),
                 progress=False)  # fmt: skip
    assert list(tmp_path.iterdir()) == []  # nothing cached for a failed generation


def test_cache_hit_and_miss(model, tokenizer, tmp_path, monkeypatch, caplog):
    targets = SelfTargets(max_new_tokens=6, cache_dir=tmp_path / "cache")
    first = generate_self_targets(model, tokenizer, PROMPTS, targets, progress=False)
    assert first["metadata"]["cache"]["hit"] is False
    (path,) = (tmp_path / "cache").iterdir()
    on_disk = json.loads(path.read_text())
    assert on_disk["prompts"] == PROMPTS and on_disk["response_ids"] == first["response_ids"]

    real_generate = model.generate
    calls = []

    def counting_generate(*args, **kwargs):
        calls.append(1)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", counting_generate)
    again = generate_self_targets(model, tokenizer, PROMPTS, targets, progress=False)
    assert again["metadata"]["cache"]["hit"] is True and not calls
    assert again["response_ids"] == first["response_ids"] and again["metadata"]["key"] == first["metadata"]["key"]
    # the map's record is the same whether the answers were generated or read
    assert {k: v for k, v in again["metadata"].items() if k != "cache"} == {
        k: v for k, v in first["metadata"].items() if k != "cache"
    }

    # Other prompts, another max_new_tokens or other weights: another key, so a miss (and a second file).
    for prompts, options in ((PROMPTS[:3], {}), (PROMPTS, {"max_new_tokens": 5})):
        calls.clear()
        other = generate_self_targets(model, tokenizer, prompts, SelfTargets(**{**vars(targets), **options}),
                                      progress=False)  # fmt: skip
        assert other["metadata"]["cache"]["hit"] is False and calls
    saved = model.lm_head.weight.detach().clone()
    with torch.no_grad():
        model.lm_head.weight.add_(1e-3)
    calls.clear()
    assert (
        generate_self_targets(model, tokenizer, PROMPTS, targets, progress=False)["metadata"]["cache"]["hit"] is False
    )
    assert calls and len(list((tmp_path / "cache").iterdir())) == 4

    # A damaged cache file is regenerated (with a warning), never trusted.
    with torch.no_grad():
        model.lm_head.weight.copy_(saved)
    path.write_text('{"format": 1, "key": "truncated')
    calls.clear()
    with caplog.at_level(logging.WARNING, logger="cast_peft.diagnosis.self_targets"):
        repaired = generate_self_targets(model, tokenizer, PROMPTS, targets, progress=False)
    assert calls and repaired["response_ids"] == first["response_ids"] and "unreadable" in caplog.text
    assert json.loads(path.read_text())["response_ids"] == first["response_ids"]
