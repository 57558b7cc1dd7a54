"""Write a merged Llama-architecture model as a GGUF file for llama.cpp.

What llama.cpp needs and this writes: the ``llama`` architecture metadata (sizes,
heads, RoPE base, norm epsilon, context length), the byte-level BPE tokenizer as
a ``gpt2`` vocabulary (tokens, token types, merges, special token ids), the chat
template used in training, and the tensors under llama.cpp's names. Two facts
carried over from llama.cpp's own converter: Q and K projection rows are permuted
from Hugging Face's rotary layout (halves) to llama.cpp's (interleaved pairs), and
one-dimensional tensors (norms, biases) stay float32 whatever the file type.

Tensors are read and written one at a time from the safetensors shards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer

from tunelab.errors import UserError
from tunelab.export.merge import checkpoint_tensors

QUANT_TYPES = ("f16", "q8_0", "f32")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name for a Hugging Face Llama tensor name."""
    stem, kind = hf_name.rsplit(".", 1)
    if stem in TOP_NAMES:
        return f"{TOP_NAMES[stem]}.{kind}"
    parts = stem.split(".")
    if parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in LAYER_NAMES:
        return f"blk.{parts[2]}.{LAYER_NAMES['.'.join(parts[3:])]}.{kind}"
    raise UserError(f"tensor {hf_name} has no GGUF name in the llama architecture; this model cannot be exported.")


def rotary_permute(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from HF's rotary halves to llama.cpp's interleaved pairs."""
    return tensor.reshape(heads, 2, tensor.shape[0] // heads // 2, *tensor.shape[1:]).swapaxes(1, 2).reshape(tensor.shape)


def export_gguf(model_dir: Path, output: Path, quant: str = "f16") -> dict:
    """Write ``model_dir`` (a merged HF folder) to ``output`` atomically; return a small report."""
    import gguf

    config = AutoConfig.from_pretrained(model_dir)
    architecture = (config.architectures or ["?"])[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"exporting {architecture} to GGUF is not supported; tunelab writes GGUF for "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)} only (use --format safetensors for this model).")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"{model_dir} uses RoPE scaling of type {rope['rope_type']}, which tunelab's GGUF writer does not "
                        "encode yet; use llama.cpp's convert_hf_to_gguf.py on the merged folder.")
    rope_theta = float(rope.get("rope_theta") or getattr(config, "rope_theta", 10000.0))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    temporary = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(temporary), "llama")
    try:
        writer.add_name(model_dir.name)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(rope_theta)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(len(tokenizer))
        writer.add_file_type(file_type[quant])
        _add_tokenizer(writer, model_dir, tokenizer)
        count = 0
        for name, tensor in checkpoint_tensors(model_dir):
            data = tensor.float()
            if ".self_attn.q_proj." in name:
                data = rotary_permute(data, config.num_attention_heads)
            elif ".self_attn.k_proj." in name:
                data = rotary_permute(data, config.num_key_value_heads)
            _add_tensor(writer, gguf_name(name), data.numpy(), quant)
            count += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        temporary.replace(output)
    finally:
        temporary.unlink(missing_ok=True)
    return {"output": str(output), "tensors": count, "quant": quant, "bytes": output.stat().st_size}


def _add_tensor(writer, name: str, data: np.ndarray, quant: str) -> None:
    import gguf

    if data.ndim == 1 or quant == "f32":
        writer.add_tensor(name, data.astype(np.float32))
    elif quant == "f16":
        writer.add_tensor(name, data.astype(np.float16))
    else:
        quantized = gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, quantized, raw_shape=quantized.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)


def _add_tokenizer(writer, model_dir: Path, tokenizer) -> None:
    """The byte-level BPE vocabulary in llama.cpp's ``gpt2`` form, special ids and the chat template."""
    import gguf

    spec = json.loads((model_dir / "tokenizer.json").read_text())
    model = spec["model"]
    if model.get("type") != "BPE" or spec.get("pre_tokenizer", {}).get("type") != "ByteLevel":
        raise UserError(f"{model_dir} does not have a byte-level BPE tokenizer, the kind tunelab's GGUF writer supports.")
    vocab = tokenizer.get_vocab()
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tokenizer.eos_token_id is not None:
        writer.add_eos_token_id(tokenizer.eos_token_id)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False))
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in vocab else None
    if end_of_turn is not None:
        writer.add_eot_token_id(end_of_turn)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
