"""One way to a ready model: mesh, checkpoint, tokenizer, this rank's weights, caches, fast decode, warm-up.

The CLI, the server, the bench, `explain` and the scripts all start here, so a model is put
together the same way everywhere.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

import torch

from .args import ModelArgs, preset_args
from .checkpoint import default_checkpoint, load_model, open_checkpoint, open_tokenizer
from .checkpoint.base import Checkpoint
from .config import Config
from .errors import UserError
from .fast_decode import enable as enable_fast_decode
from .generate import warm_up
from .log import peak_rss_bytes
from .model import Transformer
from .parallel.mesh import Mesh, init_distributed
from .parallel.pipeline import stage_layer_ids
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class Ready:
    """A model ready to generate on this rank, with what it was made from."""

    cfg: Config
    mesh: Mesh
    ckpt: Checkpoint
    model: Transformer
    tokenizer: Tokenizer | None  # None when not asked for


def with_rope_factor(args: ModelArgs, factor: float) -> ModelArgs:
    """args with its Llama 3.1-style rope scaling factor replaced (e.g. 32 for Llama 3.2 Meta checkpoints)."""
    if args.rope_scaling is None:
        raise UserError(
            "model.rope_scaling_factor: this checkpoint uses no Llama 3.1 rope scaling "
            "(params.json use_scaled_rope / HF rope_scaling); remove the override"
        )
    return dataclasses.replace(args, rope_scaling=dataclasses.replace(args.rope_scaling, factor=factor))


def open_model_checkpoint(cfg: Config) -> Checkpoint:
    """The checkpoint of model.checkpoint (default: the embedded SmolLM2), with model.* overrides applied."""
    if cfg.model.preset is not None and cfg.model.checkpoint is None:
        raise UserError(
            f"model.preset={cfg.model.preset} describes an architecture only (for `plan`); "
            f"give the weights with --checkpoint PATH"
        )
    ckpt = open_checkpoint(cfg.model.checkpoint or default_checkpoint())
    if cfg.model.rope_scaling_factor is not None:
        ckpt.args = with_rope_factor(ckpt.args, cfg.model.rope_scaling_factor)
    return ckpt


def model_args(cfg: Config) -> ModelArgs:
    """The architecture: from model.preset when given without a checkpoint, else from the checkpoint."""
    if cfg.model.preset is not None and cfg.model.checkpoint is None:
        args = preset_args(cfg.model.preset)
        if cfg.model.rope_scaling_factor is not None:
            args = with_rope_factor(args, cfg.model.rope_scaling_factor)
        return args
    return open_model_checkpoint(cfg).args


def check_vocab(tok, ckpt: Checkpoint) -> None:
    """Raise UserError when the tokenizer has ids the model's embedding does not."""
    if tok.n_words > ckpt.args.vocab_size:
        raise UserError(
            f"the tokenizer has {tok.n_words} tokens but the model's vocabulary has "
            f"{ckpt.args.vocab_size}; pass the tokenizer that belongs to the checkpoint"
        )


def open_tokenizer_for(cfg: Config, ckpt: Checkpoint) -> Tokenizer:
    """model.tokenizer, else the checkpoint's own; it must fit the model's vocabulary."""
    tok = open_tokenizer(cfg.model.tokenizer) if cfg.model.tokenizer else ckpt.tokenizer()
    check_vocab(tok, ckpt)
    return tok


def set_threads(threads: int | None) -> None:
    """Give each rank its share of the cores so ranks on one host do not oversubscribe them."""
    if threads is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if local == 1:
            return
        threads = max(1, (os.cpu_count() or 1) // local)
    torch.set_num_threads(threads)


def assemble(
    cfg: Config,
    ckpt: Checkpoint | None = None,
    tokenizer: bool | Tokenizer = True,
    warm: tuple[int, int] | None = None,
    mesh: Mesh | None = None,
) -> Ready:
    """Build this rank's ready model from a config.

    Args:
        ckpt: weights to use instead of opening model.checkpoint (e.g. a RandomCheckpoint).
        tokenizer: True: open it (open_tokenizer_for); False: none; or the one already opened.
        warm: (batch, seq_len) to warm the decode step up at, so compiling and graph capture
            happen now and not in the first request; only done when runtime.compile or CUDA graphs are on.
        mesh: an existing mesh (the CLI joins the job first to share stdin; tests); default: join the
            torchrun job described by cfg.parallel.
    """
    mesh = mesh or init_distributed(cfg.parallel, cfg.runtime)
    set_threads(cfg.runtime.threads)
    ckpt = ckpt or open_model_checkpoint(cfg)
    tok = open_tokenizer_for(cfg, ckpt) if tokenizer is True else tokenizer or None
    layer_ids = stage_layer_ids(ckpt.args, cfg.parallel, mesh)
    log.info(
        "loading %s (%s, %d layers%s) as %s",
        ckpt.path,
        type(ckpt).__name__.removesuffix("Checkpoint"),
        ckpt.args.n_layers,
        f", tp={mesh.tp.size} pp={mesh.pp.size}" if mesh.world_size > 1 else "",
        cfg.runtime.dtype
        + ("" if cfg.runtime.weights == "auto" else f", weights {cfg.runtime.weights}")
        + ("" if cfg.runtime.activations == "float" else f", activations {cfg.runtime.activations}"),
    )
    model = load_model(ckpt, mesh, cfg.runtime.torch_dtype, layer_ids, cfg.runtime.weights, cfg.runtime.activations)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = peak_rss_bytes()
    log.info(
        "stage %d tp-rank %d: layers %d-%d, %.2f GiB of weights, peak RSS %s after loading",
        mesh.stage,
        mesh.tp.rank,
        layer_ids.start,
        layer_ids.stop - 1,
        weights / 2**30,
        "n/a" if peak is None else f"{peak / 2**30:.2f} GiB",
    )
    graphs = cfg.runtime.cuda_graphs and mesh.device.type == "cuda"
    if cfg.runtime.compile:
        log.info("compiling the decode step with torch.compile (takes a while, once per run)")
    enable_fast_decode(model, cfg.runtime.compile, graphs)
    if warm is not None and model.decode_step is not None:
        warm_up(model, mesh, *warm, microbatches=cfg.parallel.microbatches)
    return Ready(cfg, mesh, ckpt, model, tok)
