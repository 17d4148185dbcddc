"""What the tests of the Hugging Face callbacks (integrations.transformers, integrations.trl) train:
a tiny GPT-2 from a local config, random token and text data, a word-level tokenizer built here,
and deterministic CPU TrainingArguments. Nothing is downloaded."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, TrainingArguments

VOCAB = 64


def tiny_gpt2(dtype=torch.float32) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=1
    )
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0  # no dropout: runs repeat exactly
    return GPT2LMHeadModel(config).to(dtype)


def token_data(n: int = 16, length: int = 12, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": x, "labels": x} for x in torch.randint(2, VOCAB, (n, length), generator=g)]


def text_data(n: int = 16, words: int = 10, seed: int = 3) -> list[str]:
    """Texts of the tokenizer's words, for trainers that tokenize themselves (TRL's SFTTrainer)."""
    g = torch.Generator().manual_seed(seed)
    return [
        " ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 2, (words,), generator=g)) for _ in range(n)
    ]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer of VOCAB words, built here (no download)."""
    import tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(VOCAB - 2)}}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>", eos_token="<eos>")


def arguments(out, max_steps: int = 6, kind=TrainingArguments, **changes) -> TrainingArguments:
    """Deterministic CPU training: fp32, sequential batches, no workers, no reporting (`kind`: a
    subclass of TrainingArguments, such as TRL's configs)."""
    settings = dict(
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
        save_strategy="no",
        logging_steps=1000,
        seed=0,
        disable_tqdm=True,
    )
    return kind(str(out), **{**settings, **changes})
