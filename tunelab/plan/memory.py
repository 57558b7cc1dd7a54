"""Per-device memory of a training run, estimated from shapes alone (no weights are loaded).

The estimate is the sum of what one device holds at the start of a backward pass in the
middle of gradient accumulation (gradients of the previous micro-batch still there):

    weights + trainable parameters + gradients + optimizer states
    + activations saved for the backward + the loss's logits buffers + backward working memory

Sources of the formulas:
* Weights, gradients, optimizer states: bytes per parameter as each library stores them
  (PyTorch AdamW keeps two states in the parameter's dtype; bitsandbytes 8-bit AdamW one byte per
  state plus a float32 scale per 256 values, 32-bit for tensors under 4096 values; DeepSpeed's
  mixed precision keeps fp32 master weights and states: 2 + 2 + 12 bytes per trained parameter,
  Rajbhandari et al. 2020, "ZeRO"). NF4 with double quantization is 4 bits plus 8 bits per block
  of 64 plus 32 bits per 256 blocks (Dettmers et al. 2023, "QLoRA", section 3).
* Activations: the per-layer accounting of Korthikanti et al. 2022 ("Reducing Activation
  Recomputation in Large Transformer Models", 34·s·b·h + 5·a·s²·b bytes per layer for GPT in
  16 bit), redone for the layers transformers runs here: RMSNorm (keeps its input in fp32 and
  1/rms), SwiGLU (gate, silu(gate), up and their product instead of GeLU's 4h), grouped-query
  attention through SDPA/flash kernels (q, k, v, output and a log-sum-exp per head; no s² score
  matrix, no dropout masks), frozen linears that keep no input, LoRA's fp32 input copies and
  r-wide intermediates, and tunelab's fused kernels (``kernels/``: x kept once per q/k/v group,
  x, gate and up per MLP, the head's input gradient instead of the logits). Every term was
  checked tensor by tensor against ``torch.autograd.graph.saved_tensors_hooks`` on CPU runs
  (tests/test_plan.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tunelab.config.schema import Config
from tunelab.plan.architectures import Architecture, Linear

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}  # auto: bf16 on the GPU being planned for
LORA_FAMILY = {"lora", "rslora", "dora", "qlora", "gatera", "adalora"}
PROMPT_LEARNING = {"prefix", "ptuning"}
NF4_BLOCK, NF4_BLOCKS_PER_SCALE = 64, 256
NF4_TABLES = 2 * 256 * 4 + 8  # per quantized layer: NF4 code table (and the double-quant one) + offset
BNB_8BIT_MIN, BNB_8BIT_BLOCK = 4096, 256
DEEPSPEED_BUCKET = 5e8        # DeepSpeed's default reduce/all-gather bucket, in elements


@dataclass
class Row:
    component: str
    bytes: float
    note: str = ""


@dataclass
class Plan:
    """The estimate for one device, row by row; ``host_bytes`` is what offloading moves to CPU RAM."""

    model: str
    recipe: str
    devices: int
    strategy: str
    tokens: int
    total_params: int
    trainable_params: int
    rows: list[Row] = field(default_factory=list)
    host_bytes: float = 0.0
    assumptions: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(row.bytes for row in self.rows)

    def row(self, component: str) -> float:
        return sum(r.bytes for r in self.rows if r.component == component)


@dataclass(frozen=True)
class Setup:
    """The facts of a config that decide memory, in one place."""

    recipe: str
    options: object
    weight_bytes: int       # unquantized base weights
    stream_bytes: int       # hidden states between layers
    compute_bytes: int      # what fused LoRA kernels keep x in
    adapter_bytes: int      # trainable adapter tensors (PEFT keeps them in fp32)
    quantized: bool
    fused_lora: bool
    fused_loss: bool
    checkpointing: bool
    batch: int
    seq: int
    eager: bool


def setup(config: Config, arch: Architecture) -> Setup:
    from tunelab.kernels.patch import LOSS_MODEL_TYPES

    recipe, options = config.recipe.name, config.recipe
    if recipe == "distill":  # the student trains; the teachers' logits were stored beforehand (offline mode)
        options = config.recipe.student
        recipe = options.name
    weight = DTYPE_BYTES[config.model.dtype]
    quantized = recipe == "qlora"
    # QLoRA: PEFT's prepare_model_for_kbit_training casts every 16-bit weight that stays unquantized to fp32,
    # so the embeddings (and with them the hidden states) are fp32; matmuls run in compute_dtype.
    stream = 4 if quantized else weight
    compute = DTYPE_BYTES[options.compute_dtype] if quantized else weight
    kernels_on = config.training.kernels != "off" and config.distributed.strategy == "ddp"
    plain_lora = recipe in ("lora", "rslora", "qlora") and options.dropout == 0 and options.bias == "none"
    needs_logits = config.recipe.name == "distill"
    return Setup(
        recipe=recipe, options=options, weight_bytes=weight, stream_bytes=stream, compute_bytes=compute,
        adapter_bytes=weight if recipe in ("bitfit", "full") else 4, quantized=quantized,
        fused_lora=kernels_on and plain_lora,
        fused_loss=kernels_on and arch.model_type in LOSS_MODEL_TYPES and recipe not in PROMPT_LEARNING and not needs_logits,
        checkpointing=config.training.gradient_checkpointing, batch=config.training.micro_batch_size,
        seq=config.data.max_length, eager=config.model.attn_implementation == "eager",
    )


# ---------------------------------------------------------------- parameters

def targeted(arch: Architecture, target_modules: str | list[str]) -> list[Linear]:
    """The linears PEFT's ``target_modules`` selects (same rules: all-linear, name suffixes, or a full-name regex)."""
    if target_modules == "all-linear":
        return arch.linears()
    if isinstance(target_modules, str):
        return [l for l in arch.linears() + [arch.head()] if re.fullmatch(target_modules, l.name)]
    return [l for l in arch.linears() + [arch.head()]
            if any(l.name == t or l.name.endswith("." + t) for t in target_modules)]


def trainable_tensors(arch: Architecture, s: Setup) -> list[tuple[int, int]]:
    """(rows, cols) of every trained tensor (a vector is (n, 1)); their sizes sum to the trained parameter count."""
    o, r, h = s.options, s.recipe, arch.hidden_size
    if r == "full":
        shapes = [(l.out_features, l.in_features) for l in arch.linears()]
        shapes += [(l.out_features, 1) for l in arch.linears() if l.bias]
        shapes += [(arch.vocab_size, h)] * (1 if arch.tied_embeddings else 2)
        shapes += [(h, 1)] * (2 * arch.num_layers + 1)
        return shapes + [(arch.dim, 1)] * (2 * arch.num_layers if arch.qk_norm else 0)
    if r == "bitfit":
        hit = {l.name for l in targeted(arch, o.target_modules)}
        return [(l.out_features, 1) for l in arch.linears() + [arch.head()] if l.bias or (l.name in hit and o.add_missing_biases)]
    if r == "prefix":
        width = arch.num_layers * 2 * arch.kv_size  # one key and one value per layer, at the KV heads width
        if not o.projection:
            return [(o.num_virtual_tokens, width)]
        enc, token = o.encoder_hidden_size, arch.kv_size
        return [(o.num_virtual_tokens, token), (enc, token), (enc, 1), (width, enc), (width, 1)]
    if r == "ptuning":
        hid = o.encoder_hidden_size or h
        shapes = [(o.num_virtual_tokens, h)]
        if o.encoder == "MLP":
            return shapes + [(hid, h), (hid, 1), (hid, hid), (hid, 1), (h, hid), (h, 1)]
        for layer_in in (h, 2 * hid):  # two bidirectional LSTM layers, then an MLP of width 2·hidden
            shapes += [(4 * hid, layer_in), (4 * hid, hid), (4 * hid, 1), (4 * hid, 1)] * 2
        return shapes + [(2 * hid, 2 * hid), (2 * hid, 1), (h, 2 * hid), (h, 1)]
    # LoRA family: A (rank × in) and B (out × rank) per targeted linear, plus each variant's extras.
    rank = o.init_r if r == "adalora" else o.r
    shapes = []
    for l in targeted(arch, o.target_modules):
        shapes += [(rank, l.in_features), (l.out_features, rank)]
        if r == "adalora":
            shapes.append((rank, 1))  # E, the singular values
        if r == "dora" or (r == "gatera" and o.use_dora):
            shapes.append((l.out_features, 1))  # magnitude
        if r == "gatera":
            shapes += [(1, l.in_features), (1, 1)]  # the per-token gate
        if getattr(o, "bias", "none") == "lora_only" and l.bias:
            shapes.append((l.out_features, 1))
    if getattr(o, "bias", "none") == "all":
        shapes += [(l.out_features, 1) for l in arch.linears() if l.bias]
    for name in getattr(o, "modules_to_save", None) or []:  # a trained copy beside the frozen original
        if name in ("lm_head", "embed_tokens"):
            shapes.append((arch.vocab_size, h))
    return shapes


def quantized_weight_bytes(params: int, layers: int, double_quant: bool) -> float:
    """NF4: half a byte per weight plus block scales (fp32 per 64, or 8-bit per 64 + fp32 per 256 blocks)."""
    blocks = params / NF4_BLOCK
    scales = blocks + 4 * blocks / NF4_BLOCKS_PER_SCALE if double_quant else 4 * blocks
    return params / 2 + scales + layers * NF4_TABLES


def optimizer_bytes(name: str, shapes: list[tuple[int, int]], param_bytes: int) -> tuple[float, str]:
    numels = [a * b for a, b in shapes]
    if name in ("adamw_torch", "adamw_torch_fused"):
        return 2 * param_bytes * sum(numels), f"AdamW: 2 states in the parameters' dtype ({param_bytes} bytes)"
    if name in ("adamw_bnb_8bit", "paged_adamw_8bit"):
        big = sum(n for n in numels if n >= BNB_8BIT_MIN)
        small = sum(numels) - big
        note = "8-bit AdamW: 2 bytes + scales per parameter (fp32 under 4096 values)"
        return 2 * big * (1 + 4 / BNB_8BIT_BLOCK) + 8 * small, note + ("; paged: spills to CPU RAM when full" if "paged" in name else "")
    if name == "paged_adamw_32bit":
        return 8 * sum(numels), "paged AdamW 32-bit: 8 bytes per parameter; paged: spills to CPU RAM when full"
    if name == "adafactor":
        return 4 * sum(a + b if b > 1 else a for a, b in shapes), "Adafactor: factored second moment (rows + columns)"
    return 0.0, "SGD without momentum: no state"


# ---------------------------------------------------------------- activations (bytes per token)

def layer_activation_bytes(arch: Architecture, s: Setup, *, first: bool = False) -> float:
    """Bytes one decoder layer keeps for the backward, per token (see the module docstring)."""
    h, q, kv, i, a = arch.hidden_size, arch.q_size, arch.kv_size, arch.intermediate_size, arch.num_heads
    e, c = s.stream_bytes, s.compute_bytes
    full, adapters = s.recipe == "full", s.recipe in LORA_FAMILY
    # A frozen embedding gives the first norm an input that needs no gradient: it keeps nothing.
    norms = 1 if first and s.recipe != "full" and s.recipe != "ptuning" else 2
    total = norms * (4 * h + 4)                           # input in fp32 and 1/rms
    if full:
        total += 2 * h * e                                # normalised input, for the norm weight's gradient
    total += 2 * q * e + 2 * kv * e + 4 * a               # SDPA/flash: q, output, k, v, log-sum-exp
    if s.eager:
        total += a * s.seq * (4 + (e if e != 4 else 0))   # eager attention keeps the fp32 softmax (and its cast)
    hit = {l.name.rsplit(".", 1)[1] for l in targeted(arch, s.options.target_modules)} if adapters else set()
    groups = {"attn_in": (h, ("q_proj", "k_proj", "v_proj")), "attn_out": (q, ("o_proj",)),
              "mlp_in": (h, ("gate_proj", "up_proj")), "mlp_out": (i, ("down_proj",))}
    mlp_fused = s.fused_lora and {"gate_proj", "up_proj", "down_proj"} <= hit
    total += h * c + 2 * i * c if mlp_fused else 3 * i * e   # fused: x, gate, up; else gate, silu, up
    for group, (width, members) in groups.items():
        if mlp_fused and group.startswith("mlp"):
            continue
        shared = group == "attn_out"  # the attention output is already kept by SDPA
        if full:
            total += 0 if shared else width * e
            continue
        n = len(hit.intersection(members))
        if not n:
            continue
        if s.fused_lora:  # the kernels keep x once per group, in the compute dtype
            total += 0 if shared and c == e else width * c
            continue
        # PEFT casts the input to the fp32 adapter for each layer (one shared tensor when it is fp32 already);
        # dropout adds a dropped-out fp32 copy and its mask per layer (measured on CPU, where the mask of a
        # cast copy is a float tensor; a GPU keeps a 1-byte mask instead).
        total += (0 if shared else width * 4) if e == 4 else n * width * 4
        if s.options.dropout > 0:
            total += n * width * (5 if e == 4 else 4)
        rank = s.options.init_r if s.recipe == "adalora" else s.options.r
        total += n * rank * 4                              # A·x, kept for B's gradient
        outs = {"q_proj": q, "k_proj": kv, "v_proj": kv, "o_proj": h, "gate_proj": i, "up_proj": i, "down_proj": h}
        out = sum(outs[m] for m in hit.intersection(members))
        if s.recipe == "dora" or (s.recipe == "gatera" and s.options.use_dora):
            total += out * (e + 4)                         # DoRA keeps the base and the LoRA result to rescale
        if s.recipe == "gatera":
            total += out * 4 + n * 4                       # the gated update and the gate
    return total


def activation_bytes(arch: Architecture, s: Setup) -> dict[str, tuple[float, str]]:
    """Bytes kept for the backward (activations, logits) and the transient peak on top, each with its formula."""
    tokens = s.batch * (s.seq + (s.options.num_virtual_tokens if s.recipe == "ptuning" else 0))
    h, e, v = arch.hidden_size, s.stream_bytes, arch.vocab_size
    layer = layer_activation_bytes(arch, s)
    first = layer_activation_bytes(arch, s, first=True)
    if s.checkpointing:
        kept = arch.num_layers * h * e * tokens                    # each layer's input; the layer is re-run in the backward
        how = f"checkpointing: {arch.num_layers} layer inputs × {h * e} B/token"
    else:
        kept = (first + (arch.num_layers - 1) * layer) * tokens
        how = f"{layer:,.0f} B/token per layer × {arch.num_layers} layers × {tokens:,} tokens"
    if s.recipe == "prefix":  # every layer's keys and values are longer by the virtual tokens
        kept += arch.num_layers * 2 * arch.kv_size * e * s.batch * s.options.num_virtual_tokens
    head_trains = s.recipe == "full"
    kept += (4 * h + 4 + (2 * h * e if head_trains else 0) + 16) * tokens   # final norm, head input, ids, labels
    if s.fused_loss:
        from tunelab.kernels.linear_ce import chunk_rows

        rows = min(tokens, chunk_rows(v))
        logits = h * e * tokens                                   # the head's input gradient, made in the forward
        if head_trains:
            logits += v * h * s.weight_bytes                      # and the head's weight gradient
        loss = 8 * rows * v                                       # one chunk of fp32 logits and their gradient
        logits_how = f"fused linear cross-entropy: no logits kept, chunks of {rows} rows × {v:,}"
    else:
        logits = 4 * v * tokens                                   # fp32 log-probabilities kept for the backward
        loss = (8 + (e if e != 4 else 0)) * v * tokens            # their gradient and the logits' (+ 16-bit cast)
        logits_how = f"full logits: {tokens:,} tokens × {v:,} vocabulary in fp32"
    # Backward working memory: gradients flowing through one layer (hidden and MLP widths).
    working = (2 * h + 2 * arch.intermediate_size) * e * tokens
    if s.checkpointing:
        working += layer * tokens                                  # the layer being re-run keeps its activations
    peak_how = (f"largest of: loss {loss / 2**30:.2f} GiB, backward through one layer {working / 2**30:.2f} GiB"
                + (" (re-run for checkpointing)" if s.checkpointing else ""))
    return {"activations": (kept, how), "logits": (logits, logits_how), "working peak": (max(loss, working), peak_how)}


# ---------------------------------------------------------------- the estimate

def estimate(config: Config, arch: Architecture, devices: int = 1) -> Plan:
    """The per-device estimate for ``config`` on ``devices`` GPUs (sharding as ``distributed`` says)."""
    s = setup(config, arch)
    dist = config.distributed
    shapes = trainable_tensors(arch, s)
    trained = sum(a * b for a, b in shapes)
    base = arch.parameters()
    total_params = base + (0 if s.recipe in ("full",) else trained - _existing_biases(arch, s))
    plan = Plan(config.model.name_or_path, s.recipe, devices, _strategy_name(config, devices),
                s.batch * s.seq, total_params, trained)
    n = devices
    fsdp = dist.strategy == "fsdp" and (n > 1 or dist.fsdp.cpu_offload)
    zero = dist.strategy == "deepspeed"
    stage = dist.deepspeed.zero_stage if zero else 0
    mixed = zero and s.weight_bytes == 2  # DeepSpeed bf16/fp16: fp32 master weights and states
    shard_weights = fsdp or stage == 3
    shard_state = fsdp or zero

    # Base weights.
    if s.quantized:
        linear = sum(l.in_features * l.out_features for l in arch.linears())
        rest = base - linear
        weights = quantized_weight_bytes(linear, len(arch.linears()), s.options.double_quant) + 4 * rest
        note = (f"{linear / 1e9:.2f} B linear weights in {s.options.quant_type.upper()}"
                f"{' + double-quant scales' if s.options.double_quant else ' + fp32 scales'}; "
                f"{rest / 1e9:.2f} B (embeddings, norms, head) in fp32 after PEFT's k-bit preparation")
    else:
        weights = base * s.weight_bytes
        note = f"{base / 1e9:.2f} B parameters × {s.weight_bytes} bytes ({config.model.dtype})"
    unit = weights / arch.num_layers  # one decoder layer: what FSDP / ZeRO-3 gathers at a time
    if shard_weights:
        offloaded = dist.fsdp.cpu_offload if fsdp else dist.deepspeed.offload_params
        kept = 2 * unit if offloaded else min(weights, weights / n + 2 * unit)
        plan.host_bytes += weights / n if offloaded else 0
        plan.rows.append(Row("weights", kept,
                             note + f"; sharded over {n}" + (", offloaded to CPU" if offloaded else "")
                             + "; 2 layers gathered at a time"))
    else:
        plan.rows.append(Row("weights", weights, note))

    # Trainable parameters (adapters; for full fine-tuning they are the weights above).
    param_bytes = 2 if mixed else s.adapter_bytes
    if s.recipe != "full":
        adapter = trained * param_bytes
        plan.rows.append(Row("adapter", adapter / n if shard_weights else adapter,
                             f"{trained:,} trainable parameters × {param_bytes} bytes"))

    # Gradients and optimizer states.
    grads = trained * param_bytes
    opt, opt_note = optimizer_bytes(config.training.optimizer, shapes, param_bytes)
    if mixed:
        opt, opt_note = 12 * trained, "DeepSpeed mixed precision: fp32 master weights + 2 fp32 AdamW states (12 bytes)"
    if config.recipe.name == "adalora":
        opt += 2 * 4 * trained
        opt_note += "; AdaLoRA importance and uncertainty scores (2 × fp32)"
    if shard_state:
        grads, opt = grads / n, opt / n
        offload_opt = (fsdp and dist.fsdp.cpu_offload) or (zero and dist.deepspeed.offload_optimizer)
        if offload_opt:  # the gradient shards follow the optimizer to the CPU (ZeRO-Offload, FSDP offload)
            plan.host_bytes += opt + grads
            opt = grads = 0.0
            opt_note += "; offloaded to CPU with the gradients"
        opt_note += f"; sharded over {n}"
    plan.rows.append(Row("gradients", grads, f"{param_bytes}-byte gradients of the trained parameters"
                         + (f"; sharded over {n}" if shard_state else "") + ("; offloaded to CPU" if shard_state and not grads else "")))
    plan.rows.append(Row("optimizer", opt, opt_note))
    if n > 1 and dist.strategy == "ddp":
        plan.rows.append(Row("DDP buckets", trained * param_bytes, "DDP's gradient buckets: one more copy of the gradients"))
    if zero:
        plan.rows.append(Row("ZeRO buckets", 2 * min(DEEPSPEED_BUCKET, trained) * param_bytes,
                             "DeepSpeed's default reduce and all-gather buckets (5e8 elements each)"))

    for component, (value, how) in activation_bytes(arch, s).items():
        plan.rows.append(Row(component, value, how))
    plan.assumptions = _assumptions(config, s)
    return plan


def _existing_biases(arch: Architecture, s: Setup) -> int:
    """Trained parameters that are part of the base already (BitFit / bias: all train existing biases)."""
    if s.recipe == "bitfit" or getattr(s.options, "bias", "none") == "all":
        return sum(l.out_features for l in arch.linears() if l.bias)
    return 0


def _strategy_name(config: Config, devices: int) -> str:
    dist = config.distributed
    if dist.strategy == "deepspeed":
        return f"DeepSpeed ZeRO-{dist.deepspeed.zero_stage}"
    return "FSDP2" if dist.strategy == "fsdp" else ("DDP" if devices > 1 else "one device")


def _assumptions(config: Config, s: Setup) -> list[str]:
    notes = [f"every row full: micro_batch_size {s.batch} × max_length {s.seq} tokens (padding to the longest "
             "row in a batch makes real batches smaller)"]
    if config.model.dtype == "auto":
        notes.append("dtype auto taken as bfloat16 (a GPU with bf16)")
    if not s.eager:
        notes.append("attention through SDPA/flash kernels (no s² score matrix)")
    notes.append("linear cross-entropy " + ("fused (training.kernels on)" if s.fused_loss else "not fused: full logits"))
    if config.recipe.name == "distill":
        notes.append(f"distillation: the student ({s.recipe}) only; online mode holds the teachers as well (not counted)")
    return notes


def gib(value: float) -> float:
    return value / 2**30
