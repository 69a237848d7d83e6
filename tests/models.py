"""Tiny randomly initialised models of every supported architecture, built offline from transformers configs."""

from __future__ import annotations

import torch
import transformers


VOCAB = 96

# Each config exercises what its architecture brings: GQA (llama, mistral, qwen2, qwen3, phi3), MQA and
# head_dim != hidden / heads (gemma3_text, qwen3), fused Conv1D [Q|K|V] (gpt2), per-head interleaved qkv (gpt_neox),
# q/k/v biases (qwen2, gpt2, gpt_neox).
TINY_CONFIGS: dict[str, transformers.PretrainedConfig] = {
    "llama": transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    "mistral": transformers.MistralConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    "qwen2": transformers.Qwen2Config(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    "qwen3": transformers.Qwen3Config(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
    ),
    "gemma3_text": transformers.Gemma3TextConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=8,
    ),
    "gpt2": transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "gpt_neox": transformers.GPTNeoXConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4
    ),
    "phi3": transformers.Phi3Config(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    ),
}
ARCHS = sorted(TINY_CONFIGS)


def build_tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> transformers.PreTrainedModel:
    """A deterministic tiny causal LM of ``arch`` with eager attention (so per-head outputs are exact)."""
    config = TINY_CONFIGS[arch].__class__.from_dict(TINY_CONFIGS[arch].to_dict())
    config.vocab_size = VOCAB
    config.bos_token_id = config.eos_token_id = 1
    config.pad_token_id = 0
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    if arch in ("qwen2",):
        # Qwen2 initialises q/k/v biases to zero; random biases make the bias-row checks meaningful.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0, 0.1)
    return model.eval()


def save_bnb_sized_llama(path) -> None:
    """Save a tiny random Llama wide enough for bitsandbytes' CPU 4-bit kernels (in_features >= their 64 block)."""
    config = transformers.LlamaConfig(
        hidden_size=128,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)


def tiny_batch(seed: int = 0, batch: int = 2, length: int = 10) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, VOCAB, (batch, length), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_tokenizer(chat: bool = True) -> transformers.PreTrainedTokenizerFast:
    """A character-level BPE tokenizer with ``VOCAB`` ids (fits the tiny models), trained offline on the starter set."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from cast_peft.data import starter_set

    corpus = [f"{ex['prompt']} {ex['response']}" for kind in ("safety", "utility") for ex in starter_set(kind)]
    specials = ["<pad>", "<|end|>", "<unk>", "<|user|>", "<|assistant|>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.decoder = decoders.Metaspace()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials, limit_alphabet=60))
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", eos_token="<|end|>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE if chat else None
    return tokenizer


def build_byte_tokenizer(
    corpus: list[str],
    specials: list[str],
    *,
    eos: str,
    pad: str | None,
    bos: str | None = None,
    chat_template: str | None = None,
    vocab_size: int = 320,
) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained offline on ``corpus``: ``decode(encode(text)) == text`` exactly, which the
    data and evaluation tests rely on when they spell out rendered prompts (unlike :func:`build_tiny_tokenizer`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos, pad_token=pad)
    tokenizer.chat_template = chat_template
    return tokenizer
