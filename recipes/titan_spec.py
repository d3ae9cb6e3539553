"""
Template of the generated `nanollm_titan.py`: the generator writes FAMILY, FLAVOR, FLAVOR_ARGS and
NANOLLM_ROOT above the marker line and this file's code below it. torchtitan imports the module
through `[experimental] custom_import` before it looks up the train spec.
"""

FAMILY, FLAVOR, FLAVOR_ARGS, NANOLLM_ROOT = "llama3", "tiny", {}, "."
# --- generated above ---
import dataclasses  # noqa: E402
import sys  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import torch  # noqa: E402
from torchtitan.components.dataloader import BaseDataLoader  # noqa: E402
from torchtitan.protocols.train_spec import get_train_spec, register_train_spec  # noqa: E402

sys.path.append(NANOLLM_ROOT)  # after torchtitan's own modules: our token_loader (numpy + torch) reads the shards
from token_loader import TokenLoader  # noqa: E402


class ShardLoader(BaseDataLoader):
    """nanollm's TokenLoader as a torchtitan dataloader: ({"input": x}, y), both (B, T) int64."""

    def __init__(self, loader: TokenLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        while True:
            x, y = self.loader.next_batch()
            yield {"input": x}, y

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.loader.load_state_dict(state_dict)


def build_shard_dataloader(dp_world_size: int, dp_rank: int, tokenizer: object, job_config: object,
                           **kwargs: object) -> ShardLoader:
    """torchtitan's build_dataloader_fn: the same stream train.py reads, split over data-parallel ranks."""
    t, seed = job_config.training, job_config.debug.seed
    grad_accum = t.global_batch_size // (t.local_batch_size * dp_world_size)
    return ShardLoader(TokenLoader(t.dataset_path, "train", t.seq_len, t.local_batch_size, grad_accum, dp_rank,
                                   dp_world_size, seed=seed if seed is not None else 1337))


def _register() -> None:
    """Register nanollm_<family> = torchtitan's <family> spec with our flavor and shard dataloader."""
    base = get_train_spec(FAMILY)
    args_cls = type(next(iter(base.model_args.values())))
    args = dict(FLAVOR_ARGS)
    if "rope_scaling" in args:
        rope = args.pop("rope_scaling")
        args["rope_scaling_args"] = type(args_cls().rope_scaling_args)(**rope)
    spec = dataclasses.replace(base, model_args={FLAVOR: args_cls(**args)}, build_dataloader_fn=build_shard_dataloader,
                               build_tokenizer_fn=None, build_validator_fn=None)
    register_train_spec(f"nanollm_{FAMILY}", spec)


_register()
