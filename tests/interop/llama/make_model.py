"""Writes a tiny llama-architecture GGUF model for llama-server: usage: make_model.py OUT.gguf

No model hub is reachable from the test machines, so the interop tests make their own model:
2 layers, 64 dimensions, 4 heads, float32, about 0.5 MB, the same bytes on every run (fixed
seed). Its vocabulary is SentencePiece-style and byte-level: <unk>, <s>, </s>, the 256 byte
tokens <0x00>..<0xFF> and "▁" (SentencePiece's space), so any text tokenizes, one token per
byte. Its chat template is ChatML.

The weights are random, so the text is gibberish, but they are shaped so that every request
runs to max_tokens and every generated token is printable ASCII (valid UTF-8, one byte each):
dimension 0 of every token embedding is a large constant, the layers add little to it, so after
the final RMS norm the hidden state always has a large positive dimension 0. The output rows of
all other tokens (the specials, end of sequence among them, and the non-printable bytes) have a
large negative weight there, which puts their logits some 90 below the others: they are never
sampled, at any usual temperature.
"""

import argparse
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, LlamaFileType, TokenType

SEED = 14
CONTEXT_LENGTH = 8192
N_EMBD = 64
N_HEAD = 4
N_LAYER = 2
N_FF = 128
RMS_EPS = 1e-5
ROPE_BASE = 10000.0

UNK, BOS, EOS = 0, 1, 2
SPECIALS = [("<unk>", TokenType.UNKNOWN), ("<s>", TokenType.CONTROL), ("</s>", TokenType.CONTROL)]
FIRST_BYTE = len(SPECIALS)
SPACE_PIECE = "\u2581"
PRINTABLE = range(0x20, 0x7F)

# Dimension 0 of each embedding, against unit-variance noise in the other 63.
ANCHOR = 8.0
# The weight on dimension 0 of a forbidden token's output row.
FORBIDDEN = -16.0
# The spread of the allowed tokens' output rows: logits with a standard deviation near 2.
OUTPUT_STD = 0.3
# The spread of the layers' weights: small, so dimension 0 stays the largest.
LAYER_STD = 0.02

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def vocabulary() -> tuple[list[str], list[TokenType], list[int]]:
    """The tokens, their types, and the ids the model may generate."""
    tokens = [text for text, _ in SPECIALS] + [f"<0x{b:02X}>" for b in range(256)] + [SPACE_PIECE]
    types = [kind for _, kind in SPECIALS] + [TokenType.BYTE] * 256 + [TokenType.NORMAL]
    allowed = [FIRST_BYTE + b for b in PRINTABLE] + [len(tokens) - 1]
    return tokens, types, allowed


def weights(n_vocab: int, allowed: list[int]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)

    def normal(*shape: int, std: float) -> np.ndarray:
        return rng.normal(0.0, std, size=shape).astype(np.float32)

    embeddings = normal(n_vocab, N_EMBD, std=1.0)
    embeddings[:, 0] = ANCHOR
    output = normal(n_vocab, N_EMBD, std=OUTPUT_STD)
    output[:, 0] = 0.0
    forbidden = np.setdiff1d(np.arange(n_vocab), allowed)
    output[forbidden] = 0.0
    output[forbidden, 0] = FORBIDDEN

    tensors = {
        "token_embd.weight": embeddings,
        "output_norm.weight": np.ones(N_EMBD, dtype=np.float32),
        "output.weight": output,
    }
    for layer in range(N_LAYER):
        block = f"blk.{layer}"
        tensors |= {
            f"{block}.attn_norm.weight": np.ones(N_EMBD, dtype=np.float32),
            f"{block}.attn_q.weight": normal(N_EMBD, N_EMBD, std=LAYER_STD),
            f"{block}.attn_k.weight": normal(N_EMBD, N_EMBD, std=LAYER_STD),
            f"{block}.attn_v.weight": normal(N_EMBD, N_EMBD, std=LAYER_STD),
            f"{block}.attn_output.weight": normal(N_EMBD, N_EMBD, std=LAYER_STD),
            f"{block}.ffn_norm.weight": np.ones(N_EMBD, dtype=np.float32),
            f"{block}.ffn_gate.weight": normal(N_FF, N_EMBD, std=LAYER_STD),
            f"{block}.ffn_up.weight": normal(N_FF, N_EMBD, std=LAYER_STD),
            f"{block}.ffn_down.weight": normal(N_EMBD, N_FF, std=LAYER_STD),
        }
    return tensors


def write(path: Path) -> None:
    tokens, types, allowed = vocabulary()
    writer = GGUFWriter(path, "llama")
    writer.add_name("keygate-tiny-llama")
    writer.add_file_type(LlamaFileType.ALL_F32)
    writer.add_vocab_size(len(tokens))
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_rope_freq_base(ROPE_BASE)

    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(types)
    writer.add_unk_token_id(UNK)
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    for name, tensor in weights(len(tokens), allowed).items():
        writer.add_tensor(name, tensor)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the .gguf file to write")
    path = parser.parse_args().out
    partial = path.with_name(path.name + ".partial")
    write(partial)
    partial.replace(path)


if __name__ == "__main__":
    main()
