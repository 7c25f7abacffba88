"""python -m moe_dist.export: a checkpoint as one safetensors file for one device, or as a Hugging Face model.

Also the single-process loader that moe_dist.generate uses: a run dir (its `latest` checkpoint), a
checkpoint step-<N> dir (torch.distributed.checkpoint), an export dir (model.safetensors) or a Hugging Face
model dir of a family moe_dist imports.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.distributed.checkpoint.api import CheckpointException

from moe_dist.checkpoint import COMPLETE, CheckpointError, latest_checkpoint, verify
from moe_dist.cli import OneLineParser, error_line
from moe_dist.config import Config, ConfigError, load_config, to_toml
from moe_dist.data import DataError, one_line
from moe_dist.data.tokenizer import TOKENIZER_CONFIG, bos_id, eos_id, eos_token, load_tokenizer
from moe_dist.files import WriteError, default_file_mode, refused_write, staging_dir, swap_in, unwritable_reason
from moe_dist.hf.config import (FAMILIES, HF_CONFIG, Family, family_blocker, family_of, hf_config, hf_tokenizer,
                                is_hf_dir, is_native_export, source_token_ids)
from moe_dist.hf.weights import hf_state_dict, import_model
from moe_dist.model import Transformer, moe_layers
from moe_dist.run_lock import RunInUseError, refuse_if_live
from moe_dist.startup import RUN_MARKER

WEIGHTS = "model.safetensors"
CONFIG = "config.toml"
TOKENIZER = "tokenizer.json"
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index: a step dir, complete or not
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ExportError(RuntimeError):
    """A checkpoint that cannot be found, read or converted; the message is one line naming it."""


def resolve_checkpoint(path: str | Path) -> Path:
    """The directory holding the weights: an export dir or step dir as given, a run dir's `latest` checkpoint."""
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"checkpoint {path}: no such directory")
    if (path / WEIGHTS).is_file() or is_hf_dir(path):
        return path
    if (path / COMPLETE).is_file() or (path / DCP_METADATA).is_file():
        step = path
    else:
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        step = latest_checkpoint(root)
        if step is None:
            raise ExportError(f"checkpoint {path}: no 'latest' checkpoint; not a run dir, a checkpoint dir "
                              f"({COMPLETE}) or an export dir ({WEIGHTS})")
    try:
        verify(step)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    return step


def _beside(checkpoint: Path, name: str) -> Path | None:
    """`name` in the checkpoint dir, else in the run dir above checkpoints/step-<N>/."""
    candidates = [checkpoint / name]
    if checkpoint.parent.name == "checkpoints":
        candidates.append(checkpoint.parent.parent / name)
    return next((c for c in candidates if c.is_file()), None)


def load_for_inference(path: str | Path) -> tuple[Transformer, Config, Path | None]:
    """(model in eval mode on CPU, its config, its tokenizer.json or None) from a run, checkpoint or export dir."""
    return _load_verified(resolve_checkpoint(path))


def _load_verified(checkpoint: Path) -> tuple[Transformer, Config, Path | None]:
    config_path = _beside(checkpoint, CONFIG)
    if config_path is None and is_hf_dir(checkpoint):  # a Hugging Face model dir: ours or a family's
        try:
            model, cfg = import_model(checkpoint)
        except (ConfigError, CheckpointError) as e:
            raise ExportError(str(e)) from None
        return model.eval(), cfg, hf_tokenizer(checkpoint)
    if config_path is None:
        raise ExportError(f"checkpoint {checkpoint}: no {CONFIG} in it or in its run dir")
    cfg = load_config(str(config_path))
    model = Transformer(cfg.model, cfg.moe)
    try:
        if (checkpoint / WEIGHTS).is_file():
            state = load_file(checkpoint / WEIGHTS)
        else:
            loaded = {"model": model.state_dict()}
            with warnings.catch_warnings():  # DCP warns that it loads in one process, which is the point here
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(loaded, checkpoint_id=checkpoint, no_dist=True)
            state = loaded["model"]
        model.load_state_dict(state)
    except (Exception, CheckpointException) as e:  # assorted types for unreadable or mismatched files
        if isinstance(e, CheckpointException):  # a BaseException wrapping what failed on each rank
            e = next(iter(e.failures.values()))[0]
        raise ExportError(f"checkpoint {checkpoint}: cannot load its weights into the model of {config_path} "
                          f"({one_line(e)})") from None
    return model.eval(), cfg, _beside(checkpoint, TOKENIZER)


def consolidated_state_dict(model: Transformer, dtype: torch.dtype) -> dict[str, Tensor]:
    """The model's state dict as contiguous CPU tensors, parameters cast to `dtype`."""
    params = {name for name, _ in model.named_parameters()}
    # Buffers (the routing selection bias) keep their dtype: rounding them would change which experts are chosen.
    return {name: (t.to(dtype) if name in params else t).detach().cpu().contiguous()
            for name, t in model.state_dict().items()}


def hf_blocker(cfg: Config, model: Transformer, family: Family) -> str | None:
    """What keeps the model from mapping onto `family`, as a phrase naming the key; None if it maps."""
    reason = family_blocker(cfg, family)
    biased = any(m.router.expert_bias.any() for m in moe_layers(model))
    if reason is None and biased and family.correction_bias is None and cfg.moe.aux_free_bias:
        reason = (f"moe.aux_free_bias = true with a nonzero learned expert_bias ({family.architecture} has no "
                  f"selection bias)")
    if reason is None and biased and not cfg.moe.aux_free_bias:
        reason = "moe.aux_free_bias = false with a nonzero expert_bias, which transformers would select with"
    return reason


def _source_root(checkpoint: Path) -> Path:
    """The directory an export reads from: the run dir above checkpoints/step-<N>, else the checkpoint dir."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint


def check_out_dir(out: Path, checkpoint: Path) -> Path:
    """ExportError unless `out` is a new or empty directory outside what is being exported."""
    out = out.resolve()
    source = _source_root(checkpoint).resolve()
    checkpoints = source / "checkpoints"  # the trainer prunes and replaces what is in there
    if out == source or out in source.parents or out == checkpoints or checkpoints in out.parents:
        raise ExportError(f"export: --out {out} would be written over {source}, which it exports from; "
                          f"give a directory outside it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"export: --out {out} is an existing file; give a new or empty directory")
    if out.is_dir() and any(out.iterdir()):
        raise ExportError(f"export: --out {out} is not empty; give a new or empty directory (nothing is overwritten)")
    reason = unwritable_reason(out)
    if reason is not None:
        raise ExportError(f"export: --out {out}: {reason}")
    for run_dir in (p for p in (out, *out.parents) if (p / RUN_MARKER).is_file()):  # a run's trainer owns it
        refuse_if_live("export", run_dir)
    return out


def write_export(model: Transformer, cfg: Config, tokenizer_path: Path | None, out: Path, family: Family | None,
                  dtype: str) -> None:
    if family is not None:
        token_ids = source_token_ids(cfg, tokenizer_path.parent if tokenizer_path else None)  # the source's exactly
        if token_ids is None and cfg.train.init_from and not is_native_export(cfg.train.init_from):
            print(f"export: warning: train.init_from = {cfg.train.init_from}, the model this run was imported from, "
                  f"has no {HF_CONFIG} any more: its special-token ids are not carried", file=sys.stderr)
        bos = eos = None
        if token_ids is None and tokenizer_path:
            tokenizer = load_tokenizer(tokenizer_path)
            eos = eos_id(tokenizer, tokenizer_path)
            bos = bos_id(tokenizer, tokenizer_path)
        save_file(hf_state_dict(model, cfg, family, DTYPES[dtype]), out / WEIGHTS, metadata={"format": "pt"})
        # Our own tokenizers have one special token, <|endoftext|>, which both ends and starts documents.
        config = hf_config(cfg, family, dtype, eos if bos is None else bos, eos, token_ids)
        (out / HF_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        source_config = tokenizer_path.parent / TOKENIZER_CONFIG if tokenizer_path else None
        if source_config is not None and source_config.is_file():  # an imported run's: its chat template too
            shutil.copyfile(source_config, out / TOKENIZER_CONFIG)
        elif tokenizer_path:
            token = eos_token(tokenizer_path)
            tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token, "eos_token": token,
                                "model_max_length": cfg.model.max_seq_len, "clean_up_tokenization_spaces": False}
            (out / TOKENIZER_CONFIG).write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    else:
        save_file(consolidated_state_dict(model, DTYPES[dtype]), out / WEIGHTS, metadata={"format": "pt"})
        (out / CONFIG).write_text(to_toml(cfg))
    os.chmod(out / WEIGHTS, default_file_mode())  # safetensors writes 0600; an export is for sharing
    if tokenizer_path:
        shutil.copyfile(tokenizer_path, out / TOKENIZER)


def export(path: str | Path, out: str | Path, fmt: str = "native", dtype: str = "float32",
           family: str = "auto") -> Path:
    """Write the checkpoint at `path` to `out` as model.safetensors + config + tokenizer; returns `out`.

    With fmt "hf", as the Hugging Face `family` (a model_type; "auto": the one the model's features imply, which
    is the one a run imported from). Everything is checked first; the export is built beside `out` and renamed
    into place when complete.
    """
    checkpoint = resolve_checkpoint(path)
    out = check_out_dir(Path(out), checkpoint)
    model, cfg, tokenizer_path = _load_verified(checkpoint)
    target = None
    if fmt == "hf":
        target = family_of(cfg) if family == "auto" else FAMILIES[family]
        reason = hf_blocker(cfg, model, target)
        if reason is not None:
            raise ExportError(f"export: --format hf needs a model {target.architecture} expresses, but {reason}")
    staging = staging_dir(out, "export")
    try:
        write_export(model, cfg, tokenizer_path, staging, target, dtype)
        swap_in(staging, out)
    except SafetensorError as e:  # a full disk, as safetensors reports it (no OSError, no file name)
        raise WriteError(f"export: cannot write {staging / WEIGHTS}: {e}; nothing was exported") from None
    except OSError as e:
        raise WriteError(f"{refused_write('export', e)}; nothing was exported") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not tokenizer_path:
        print(f"export: no {TOKENIZER} found beside {path}; exported without one", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m moe_dist.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="run dir (its latest checkpoint), checkpoints/step-<N> dir or export dir")
    parser.add_argument("--out", required=True, help="output directory: new or empty")
    parser.add_argument("--format", default="native", choices=("native", "hf"),
                        help="native: for moe_dist.generate; hf: a transformers model directory (from_pretrained)")
    parser.add_argument("--family", default="auto", choices=("auto", *FAMILIES),
                        help="with --format hf: the transformers family; auto: the one the run came from")
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.format, args.dtype, args.family)
    except (ExportError, ConfigError, DataError, RunInUseError, WriteError, OSError) as e:
        print(error_line("export", e), file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} to {out} ({args.format}, {args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
