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
from moe_dist.hf.config import Family, config_from_hf, is_native_export, read_hf_config
from moe_dist.memory import meta_model
from moe_dist.model.transformer import Transformer, is_moe_layer
from moe_dist.parallel.materialize import materialize

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some checkpoints carry: older HF ones' rotary tables (recomputed), a moe_dist export's selection bias
# (restarted at 0 by a run that starts from it).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "router.expert_bias")
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


def weight_sources(cfg: Config, family: Family) -> dict[str, Plain | Experts]:
    """moe_dist parameter name -> where the family's checkpoint holds it."""
    m, moe = cfg.model, cfg.moe
    out: dict[str, Plain | Experts] = {
        "tok_embeddings.weight": Plain("model.embed_tokens.weight"), "norm.weight": Plain("model.norm.weight"),
        "output.weight": Plain("lm_head.weight")}
    swiglu = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    for i in range(m.n_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        out[ours + "attention_norm.weight"] = Plain(hf + "input_layernorm.weight")
        out[ours + "ffn_norm.weight"] = Plain(hf + "post_attention_layernorm.weight")
        for name in "qkvo":
            out[f"{ours}attention.w{name}.weight"] = Plain(f"{hf}self_attn.{name}_proj.weight")
            if m.qkv_bias and name != "o":
                out[f"{ours}attention.w{name}.bias"] = Plain(f"{hf}self_attn.{name}_proj.bias")
        if m.qk_norm != "none":
            for name in "qk":
                out[f"{ours}attention.{name}_norm.weight"] = Plain(f"{hf}self_attn.{name}_norm.weight")
        if not is_moe_layer(i, moe):
            for w, name in swiglu.items():
                out[f"{ours}ffn.{w}.weight"] = Plain(f"{hf}mlp.{name}.weight")
            continue
        block, fused = f"{hf}{family.moe_block}.", f"{hf}mlp."  # transformers 5 names its fused modules mlp
        out[ours + "ffn.router.gate.weight"] = Plain(block + "gate.weight", fused + "gate.weight")
        for w, name, fused_name, row0 in zip(("w1", "w3", "w2"), family.expert_names,
                                             ("gate_up_proj", "gate_up_proj", "down_proj"), (0, moe.expert_hidden, 0)):
            out[f"{ours}ffn.experts.{w}"] = Experts(f"{block}experts.{{j}}.{name}.weight",
                                                    f"{fused}experts.{fused_name}", row0)
        if moe.shared_expert_hidden:
            for w, name in swiglu.items():
                out[f"{ours}ffn.shared_expert.{w}.weight"] = Plain(f"{hf}mlp.shared_expert.{name}.weight")
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

    def _handle(self, path: Path):
        if path not in self._handles:
            if not path.is_file():
                raise CheckpointError(f"import: {path}: missing (listed in {INDEX_FILE})")
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"import: {path}: not a readable safetensors file ({e})") from None
        return self._handles[path]

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def shape(self, key: str) -> list[int]:
        return list(self._handle(self.files[key]).get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        return self._handle(self.files[key]).get_slice(key).get_dtype()

    def read(self, key: str, block: Block) -> Tensor:
        """Only `block` of tensor `key`, read from its file; CheckpointError if a value is NaN or infinite (a model
        that starts from it would skip every step)."""
        values = self._handle(self.files[key]).get_slice(key)[block]
        low, high = torch.aminmax(values)  # one reduction over what was just read, no tensor of flags
        if not (low.isfinite() and high.isfinite()):
            raise CheckpointError(f"import: {self.files[key]}: tensor {key} holds NaN or infinite values")
        return values

    def close(self) -> None:
        """Drop the open files: their memory-mapped pages stop counting in this process's memory (they are
        reopened, header only, by the next read)."""
        self._handles.clear()


class HFWeights:
    """A model's parameters in a safetensors checkpoint (`sources` says where each is): checked against the model
    on creation, then read a block at a time (the `read` that parallel.materialize takes)."""

    def __init__(self, directory: str | Path, sources: dict[str, Plain | Experts], param_shapes: dict[str, torch.Size]):
        self.checkpoint = HFCheckpoint(directory)
        self.sources: dict[str, Plain | Experts] = {}  # each as this checkpoint holds it: alias or layout chosen
        used = set()
        for name, shape in param_shapes.items():
            self.sources[name], keys = self._check(sources[name], list(shape))
            used |= keys
        unexpected = sorted(key for key in self.checkpoint.files if key not in used
                            and not key.endswith(IGNORED_SUFFIXES))
        if unexpected:
            raise CheckpointError(f"import: {self._file(unexpected[0])}: unexpected tensor {unexpected[0]} (the model "
                                  f"of {self.checkpoint.directory} has no such weight)")

    def _file(self, key: str) -> Path:
        return self.checkpoint.files.get(key, self.checkpoint.directory)

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

    def _check(self, source: Plain | Experts, shape: list[int]) -> tuple[Plain | Experts, set[str]]:
        """(`source` as this checkpoint holds it, the keys that hold it), after checking their shapes and dtypes."""
        if isinstance(source, Plain):
            key = source.alias if source.key not in self.checkpoint and source.alias in self.checkpoint else source.key
            self._expect(key, shape)
            return Plain(key), {key}
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
            return self._read(self.sources[name], block).clone()
        finally:
            # A block read from a memory-mapped file keeps the pages it touched mapped while the file is open:
            # closing after each parameter keeps a rank's peak at its shards, not its shards plus those pages.
            self.checkpoint.close()

    def _read(self, source: Plain | Experts, block: Block) -> Tensor:
        if isinstance(source, Plain):
            return self.checkpoint.read(source.key, block)
        experts, rows, cols = block
        if source.in_fused:
            shifted = slice(source.row0 + cols.start, source.row0 + cols.stop)
            return self.checkpoint.read(source.fused, (experts, shifted, rows)).transpose(1, 2)
        return torch.stack([self.checkpoint.read(source.key(j), (cols, rows)).T
                            for j in range(experts.start, experts.stop)])


def open_init_weights(cfg: Config) -> HFWeights:
    """The weights of train.init_from (a Hugging Face model dir, or a moe_dist export under our own names), checked
    (headers only) against the model `cfg` describes."""
    shapes = {name: p.shape for name, p in meta_model(cfg).named_parameters()}
    if is_native_export(cfg.train.init_from):
        return HFWeights(cfg.train.init_from, {name: Plain(name) for name in shapes}, shapes)
    family, _, _ = read_hf_config(cfg.train.init_from)
    return HFWeights(cfg.train.init_from, weight_sources(cfg, family), shapes)


def import_model(directory: str | Path, overrides: dict[str, object] | None = None) -> tuple[Transformer, Config]:
    """The Hugging Face model in `directory` as one moe_dist Transformer on the CPU, and its config: what
    generate and export load from a Hugging Face dir, and the single-process model a sharded import equals."""
    cfg = config_from_hf(directory, {**(overrides or {}), "train.init_from": str(directory)})
    model = meta_model(cfg)
    materialize(model, torch.device("cpu"), open_init_weights(cfg).read)
    return model, cfg


def hf_state_dict(model: torch.nn.Module, cfg: Config, family: Family, dtype: torch.dtype) -> dict[str, Tensor]:
    """The weights under the family's names, in the per-expert layout that transformers' save_pretrained writes."""
    params = dict(model.named_parameters())
    out = {}
    for name, source in weight_sources(cfg, family).items():
        if isinstance(source, Plain):
            out[source.key] = params[name]
        else:
            out.update({source.key(j): expert.T for j, expert in enumerate(params[name])})
    return {key: t.detach().to(dtype).cpu().contiguous() for key, t in out.items()}
