"""Hugging Face safetensors weights <-> moe_dist parameters: one name map drives both import and export.

Import reads lazily: a rank asks for one block of one parameter (the part its FSDP and EP shards own) and only
that block is read from the files, so no rank ever holds more than its shards plus one tensor. Both expert
layouts load: per-expert keys (experts.<j>.w1 / gate_proj ..., [hidden, dim] each, what save_pretrained
writes) and transformers 5's fused in-memory layout (gate_up_proj [E, 2 * hidden, dim], down_proj
[E, dim, hidden]). Ours are [E, dim, hidden] for w1 / w3 and [E, hidden, dim] for w2, applied as x @ w.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from moe_dist.checkpoint import CheckpointError
from moe_dist.config import Config
from moe_dist.hf.config import config_from_hf, is_native_export, read_hf_config, upcycles
from moe_dist.hf.families import DenseFamily, Family
from moe_dist.hf.quantized import fp8_block_size, mxfp4_shape, quantized_tensors, read_fp8, read_mxfp4
from moe_dist.hf.upcycle import UpcycledWeights, dense_config
from moe_dist.memory import meta_model
from moe_dist.model.transformer import Transformer, is_moe_layer
from moe_dist.parallel.materialize import filled_tensors, materialize

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # older HF checkpoints' rotary tables: recomputed
FLOAT_DTYPES = ("F32", "F16", "BF16")
Block = tuple[slice, ...]


@dataclass(frozen=True)
class Plain:
    """A tensor stored as ours is: `key`, or `alias` in the fused layout's naming."""

    key: str
    alias: str | None = None


@dataclass(frozen=True)
class Experts:
    """One expert projection: per-expert [hidden, dim] or [dim, hidden] keys (`per_expert` with {j}), or rows
    `row0`... of a fused [E, rows, cols] tensor (`in_fused`, once the checkpoint is found to hold that); either
    way each expert's matrix is the transpose of ours."""

    per_expert: str
    fused: str
    row0: int
    in_fused: bool = False

    def key(self, j: int) -> str:
        return self.per_expert.format(j=j)


@dataclass(frozen=True)
class Interleaved:
    """Every other entry of the last dim of `key`, from `offset` (gpt-oss's gate_up_proj [E, D, 2H] and its bias
    [E, 2H]: gate at the even columns, up at the odd ones); otherwise laid out as ours."""

    key: str
    offset: int


@dataclass(frozen=True)
class Absent:
    """A buffer the family's checkpoint does not hold (a selection bias where it has none): its value is 0."""


Source = Plain | Experts | Interleaved | Absent


def _attention_sources(cfg: Config, ours: str, hf: str) -> dict[str, Source]:
    m = cfg.model
    names = ({"wq_a": "q_a_proj", "q_a_norm": "q_a_layernorm", "wq_b": "q_b_proj"} if m.q_lora_rank else
             {"wq": "q_proj"})
    if m.attention == "mla":
        names.update({"wkv_a": "kv_a_proj_with_mqa", "kv_a_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj"})
    else:
        names.update({"wk": "k_proj", "wv": "v_proj"})
        names.update({"q_norm": "q_norm", "k_norm": "k_norm"} if m.qk_norm != "none" else {})
    out = {f"{ours}attention.{name}.weight": Plain(f"{hf}self_attn.{key}.weight") for name, key in names.items()}
    out[f"{ours}attention.wo.weight"] = Plain(f"{hf}self_attn.o_proj.weight")
    biased = [*("qkv" if m.qkv_bias else ""), *("o" if m.out_bias else "")]
    out.update({f"{ours}attention.w{name}.bias": Plain(f"{hf}self_attn.{name}_proj.bias") for name in biased})
    if m.attention_sinks:
        out[f"{ours}attention.sinks"] = Plain(f"{hf}self_attn.sinks")
    return out


def _expert_sources(cfg: Config, family: Family, ours: str, hf: str) -> dict[str, Source]:
    moe = cfg.moe
    block, fused = f"{hf}{family.moe_block}.", f"{hf}mlp."  # transformers 5 names its fused modules mlp
    router = f"{ours}ffn.router."
    out: dict[str, Source] = {router + "gate.weight": Plain(f"{block}{family.router}.weight", fused + "gate.weight")}
    if moe.router_bias:
        out[router + "gate.bias"] = Plain(f"{block}{family.router}.bias")
    bias = family.correction_bias
    out[router + "expert_bias"] = Plain(block + bias, fused + bias) if bias else Absent()
    experts = f"{ours}ffn.experts."
    if family.interleaved_experts:
        for w, offset in (("w1", 0), ("w3", 1)):
            out[experts + w] = Interleaved(f"{fused}experts.gate_up_proj", offset)
            out[f"{experts}{w}_bias"] = Interleaved(f"{fused}experts.gate_up_proj_bias", offset)
        out[experts + "w2"] = Plain(f"{fused}experts.down_proj")
        out[experts + "w2_bias"] = Plain(f"{fused}experts.down_proj_bias")
        return out
    for w, name, fused_name, row0 in zip(("w1", "w3", "w2"), family.expert_names,
                                         ("gate_up_proj", "gate_up_proj", "down_proj"), (0, moe.expert_hidden, 0)):
        out[experts + w] = Experts(f"{block}experts.{{j}}.{name}.weight", f"{fused}experts.{fused_name}", row0)
    return out


def weight_sources(cfg: Config, family: Family | DenseFamily) -> dict[str, Source]:
    """moe_dist parameter (and selection-bias buffer) name -> where the family's checkpoint holds it."""
    m, moe = cfg.model, cfg.moe
    out: dict[str, Source] = {"tok_embeddings.weight": Plain("model.embed_tokens.weight"),
                              "norm.weight": Plain("model.norm.weight")}
    if not m.tie_embeddings:
        out["output.weight"] = Plain("lm_head.weight")
    swiglu = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    for i in range(m.n_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        out[ours + "attention_norm.weight"] = Plain(hf + "input_layernorm.weight")
        out[ours + "ffn_norm.weight"] = Plain(hf + "post_attention_layernorm.weight")
        out.update(_attention_sources(cfg, ours, hf))
        if not is_moe_layer(i, moe):
            for w, name in swiglu.items():
                out[f"{ours}ffn.{w}.weight"] = Plain(f"{hf}mlp.{name}.weight")
            continue
        out.update(_expert_sources(cfg, family, ours, hf))
        if moe.shared_expert_hidden:
            for w, name in swiglu.items():
                out[f"{ours}ffn.shared_expert.{w}.weight"] = Plain(f"{hf}mlp.{family.shared}.{name}.weight")
        if moe.shared_expert_gate:
            out[ours + "ffn.shared_expert_gate.weight"] = Plain(f"{hf}mlp.shared_expert_gate.weight")
    return out


class HFCheckpoint:
    """The safetensors files of a Hugging Face model dir, opened lazily: headers on open, data on read."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._handles: dict[Path, object] = {}
        index, single = self.directory / INDEX_FILE, self.directory / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = {key: self.directory / name for key, name in weight_map.items()}
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"import: {index}: not a readable safetensors index ({type(e).__name__}: "
                                      f"{e})") from None
            # A shard is a file in the model dir: an entry naming one elsewhere would load weights from outside it.
            outside = next((key for key, name in weight_map.items()
                            if Path(name).is_absolute() or ".." in Path(name).parts), None)
            if outside is not None:
                raise CheckpointError(f"import: {index}: entry {outside} names {json.dumps(weight_map[outside])}, "
                                      f"outside {self.directory} (shards are files in the model dir)")
        elif single.is_file():
            files = {key: single for key in self._handle(single).keys()}
        else:
            raise CheckpointError(f"import: {self.directory}: no {SINGLE_FILE} or {INDEX_FILE}")
        self.files = files
        by_file: dict[Path, list[str]] = {}
        for key, path in files.items():
            by_file.setdefault(path, []).append(key)
        for path, keys in sorted(by_file.items()):
            present = set(self._handle(path).keys())
            listed = next((key for key in keys if key not in present), None)
            if listed is not None:
                raise CheckpointError(f"import: {index}: lists {listed} in {path.name}, which does not hold it")
        # Quantized tensors are read as the float tensors they stand for (hf/quantized.py), dequantized by block.
        self.quantized = quantized_tensors(files)
        self.block_size = self._fp8_block_size() if any(q.format == "fp8" for q in self.quantized.values()) else None

    def _handle(self, path: Path):
        if path not in self._handles:
            if not path.is_file():
                raise CheckpointError(f"import: {path}: missing (listed in {INDEX_FILE})")
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"import: {path}: not a readable safetensors file ({e})") from None
        return self._handles[path]

    def _fp8_block_size(self) -> tuple[int, int]:
        config = self.directory / "config.json"
        try:
            return fp8_block_size(json.loads(config.read_text()).get("quantization_config") or {})
        except (OSError, ValueError, AttributeError) as e:
            raise CheckpointError(f"import: {config}: FP8 weights need a readable quantization_config ({e})") from None

    def __contains__(self, key: str) -> bool:
        return key in self.files or key in self.quantized

    def keys(self) -> list[str]:
        """Every tensor, a quantized one under the name it stands for."""
        parts = {key for q in self.quantized.values() for key in (q.data, q.scales)}
        return [key for key in self.files if key not in parts] + list(self.quantized)

    def file_of(self, key: str) -> Path:
        """The file holding `key`, else the model dir (for messages)."""
        stored = self.quantized[key].data if key in self.quantized else key
        return self.files.get(stored, self.directory)

    def shape(self, key: str) -> list[int]:
        if key in self.quantized and self.quantized[key].format == "mxfp4":
            return mxfp4_shape(self._stored_shape(self.quantized[key].data))
        return self._stored_shape(key)

    def _stored_shape(self, key: str) -> list[int]:
        return list(self._handle(self.files[key]).get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        if key in self.quantized:
            return "F32"  # what it dequantizes to
        return self._handle(self.files[key]).get_slice(key).get_dtype()

    def _read_stored(self, key: str, block: Block) -> Tensor:
        return self._handle(self.files[key]).get_slice(key)[block]

    def read(self, key: str, block: Block) -> Tensor:
        """Only `block` of tensor `key`, read from its file (and dequantized); CheckpointError if a value is NaN or
        infinite (a model that starts from it would skip every step)."""
        quantized = self.quantized.get(key)
        if quantized is None:
            values = self._read_stored(key, block)
        elif quantized.format == "fp8":
            values = read_fp8(self._read_stored, key, block, self.block_size)
        else:
            values = read_mxfp4(self._read_stored, key, block)
        low, high = torch.aminmax(values)  # one reduction over what was just read, no tensor of flags
        if not (low.isfinite() and high.isfinite()):
            raise CheckpointError(f"import: {self.file_of(key)}: tensor {key} holds NaN or infinite values")
        return values

    def close(self) -> None:
        """Drop the open files: their memory-mapped pages stop counting in this process's memory (they are
        reopened, header only, by the next read)."""
        self._handles.clear()


class HFWeights:
    """A model's parameters and selection biases in a safetensors checkpoint (`sources` says where each is): checked
    against the model on creation, then read a block at a time (the `read` that parallel.materialize takes)."""

    def __init__(self, directory: str | Path, sources: dict[str, Source], shapes: dict[str, torch.Size],
                 ignored: tuple[str, ...] = ()):  # keys, or their beginnings, the model has no use for
        self.checkpoint = HFCheckpoint(directory)
        self.sources: dict[str, Source] = {}  # each as this checkpoint holds it: alias or layout chosen
        used = set()
        for name, shape in shapes.items():
            self.sources[name], keys = self._check(sources[name], list(shape))
            used |= keys
        unexpected = sorted(key for key in self.checkpoint.keys() if key not in used
                            and not key.endswith(IGNORED_SUFFIXES) and not key.startswith(ignored))
        if unexpected:
            raise CheckpointError(f"import: {self._file(unexpected[0])}: unexpected tensor {unexpected[0]} (the model "
                                  f"of {self.checkpoint.directory} has no such weight)")

    def _file(self, key: str) -> Path:
        return self.checkpoint.file_of(key)

    def _expect(self, key: str, shape: list[int]) -> None:
        if key not in self.checkpoint:
            raise CheckpointError(f"import: {self.checkpoint.directory}: missing tensor {key}")
        found, dtype = self.checkpoint.shape(key), self.checkpoint.dtype(key)
        if found != shape:
            raise CheckpointError(f"import: {self._file(key)}: tensor {key} has shape {found}, expected {shape} "
                                  f"from the config of {self.checkpoint.directory}")
        if dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"import: {self._file(key)}: tensor {key} has dtype {dtype}, expected one of "
                                  f"{', '.join(FLOAT_DTYPES)}")

    def _check(self, source: Source, shape: list[int]) -> tuple[Source, set[str]]:
        """(`source` as this checkpoint holds it, the keys that hold it), after checking their shapes and dtypes."""
        if isinstance(source, Absent):
            return source, set()
        if isinstance(source, Plain):
            key = source.alias if source.key not in self.checkpoint and source.alias in self.checkpoint else source.key
            self._expect(key, shape)
            return Plain(key), {key}
        if isinstance(source, Interleaved):
            self._expect(source.key, [*shape[:-1], 2 * shape[-1]])
            return source, {source.key}
        experts, rows, cols = shape  # ours [E, rows, cols]; each expert's stored matrix is [cols, rows]
        if source.key(0) not in self.checkpoint and source.fused in self.checkpoint:
            fused_rows = 2 * cols if source.fused.endswith("gate_up_proj") else cols
            self._expect(source.fused, [experts, fused_rows, rows])
            return replace(source, in_fused=True), {source.fused}
        for j in range(experts):
            self._expect(source.key(j), [cols, rows])
        return source, {source.key(j) for j in range(experts)}

    def read(self, name: str, shape: torch.Size, block: Block) -> Tensor:
        """Block `block` of parameter `name` (whole shape `shape`), in our layout, as a tensor of its own."""
        try:
            return self._read(self.sources[name], block, shape).clone()
        finally:
            # A block read from a memory-mapped file keeps the pages it touched mapped while the file is open:
            # closing after each parameter keeps a rank's peak at its shards, not its shards plus those pages.
            self.checkpoint.close()

    def _read(self, source: Source, block: Block, shape: torch.Size) -> Tensor:
        if isinstance(source, Absent):
            return torch.zeros([s.stop - s.start for s in block])
        if isinstance(source, Plain):
            return self.checkpoint.read(source.key, block)
        if isinstance(source, Interleaved):
            last = block[-1]
            wide = slice(2 * last.start + source.offset, 2 * last.stop)
            return self.checkpoint.read(source.key, (*block[:-1], wide))[..., ::2]
        experts, rows, cols = block
        if source.in_fused:
            shifted = slice(source.row0 + cols.start, source.row0 + cols.stop)
            return self.checkpoint.read(source.fused, (experts, shifted, rows)).transpose(1, 2)
        return torch.stack([self.checkpoint.read(source.key(j), (cols, rows)).T
                            for j in range(experts.start, experts.stop)])


def open_init_weights(cfg: Config) -> HFWeights | UpcycledWeights:
    """The weights of train.init_from (a Hugging Face model dir, or a moe_dist export under our own names), checked
    (headers only) against the model `cfg` describes, or where that upcycles a dense source, against the dense
    model it starts from (hf/upcycle.py)."""
    upcycled = upcycles(cfg)
    source_cfg = dense_config(cfg) if upcycled else cfg
    shapes = {name: t.shape for name, t in filled_tensors(meta_model(source_cfg))}
    if is_native_export(cfg.train.init_from):
        weights = HFWeights(cfg.train.init_from, {name: Plain(name) for name in shapes}, shapes)
    else:
        family, data, _ = read_hf_config(cfg.train.init_from)
        # A tied model's checkpoint may still carry lm_head.weight, a copy of the embedding; DeepSeek-V3's and
        # GLM-4.5's multi-token-prediction layers follow the last layer, and transformers ignores them too.
        ignored = ("lm_head.weight",) if cfg.model.tie_embeddings else ()
        n_layers, mtp_layers = cfg.model.n_layers, data.get("num_nextn_predict_layers") or 0
        ignored += tuple(f"model.layers.{i}." for i in range(n_layers, n_layers + mtp_layers))
        weights = HFWeights(cfg.train.init_from, weight_sources(source_cfg, family), shapes, ignored)
    return UpcycledWeights(cfg, weights.read, shapes) if upcycled else weights


def import_model(directory: str | Path, overrides: dict[str, object] | None = None) -> tuple[Transformer, Config]:
    """The Hugging Face model in `directory` as one moe_dist Transformer on the CPU, and its config: what
    generate and export load from a Hugging Face dir, and the single-process model a sharded import equals (of a
    dense model with moe.* overrides, upcycled)."""
    cfg = config_from_hf(directory, {**(overrides or {}), "train.init_from": str(directory)})
    model = meta_model(cfg)
    materialize(model, torch.device("cpu"), open_init_weights(cfg).read)
    return model, cfg


def hf_state_dict(model: torch.nn.Module, cfg: Config, family: Family, dtype: torch.dtype) -> dict[str, Tensor]:
    """The weights under the family's names, in the layout that transformers' save_pretrained writes (per-expert
    keys, or gpt-oss's interleaved gate_up_proj). Selection biases keep float32: rounding one changes which experts
    are chosen."""
    tensors = dict(filled_tensors(model))
    params = {name for name, _ in model.named_parameters()}
    out: dict[str, Tensor] = {}
    for name, source in weight_sources(cfg, family).items():
        value = tensors[name].detach()
        value = value.to(dtype) if name in params else value
        if isinstance(source, Plain):
            out[source.key] = value
        elif isinstance(source, Interleaved):  # gate (offset 0) and up (1) alternate along the last dim
            pair = out.setdefault(source.key, value.new_empty(*value.shape[:-1], 2 * value.shape[-1]))
            pair[..., source.offset::2] = value
        elif isinstance(source, Experts):
            out.update({source.key(j): expert.T for j, expert in enumerate(value)})
    return {key: t.cpu().contiguous() for key, t in out.items()}
