"""Merge models on several processes with torch.distributed.

Every rank streams its own shard of the alignment data through the models;
``ModelMerger.fit`` all-reduces the per-space statistics (counts, means and
comoments), so every rank solves the same aligners and ends with the same
merged model, equal to what one process computes on all the data.

Launch on one machine with two processes (CPU: gloo; one GPU per process:
NCCL)::

    torchrun --nproc_per_node=2 examples/distributed_merge.py

or, without torchrun, as one ordinary process (same result)::

    python examples/distributed_merge.py

The models are small MLPs trained on scikit-learn's digits (rank 0 trains
them once into ``--models-dir``; in practice you load your own checkpoints).
Models with BatchNorm work the same way: the re-estimation of the merged
model's running statistics is all-reduced too.
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from skmerge import CCAAligner, ModelMerger
from skmerge.datasets import load_digits
from skmerge.models import get_model
from skmerge.training import evaluate, load_model, save_checkpoint, train_model


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", default="distributed_merge_models",
                        help="where the models are (trained there by rank 0 if missing)")
    parser.add_argument("--n-models", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128,
                        help="batch size of every rank's pass over its shard")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="save the merged state_dict here (rank 0)")
    return parser.parse_args()


def setup(device: str):
    """Join the process group that torchrun describes in the environment, if any."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, torch.device(device)
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)  # one GPU per process
        device, backend = f"cuda:{local_rank}", "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=10))
    return dist.get_rank(), dist.get_world_size(), torch.device(device)


def build_models(directory: Path, n_models: int, epochs: int, rank: int) -> list[torch.nn.Module]:
    paths = [directory / f"model_{k}.pt" for k in range(n_models)]
    if rank == 0 and not all(p.exists() for p in paths):
        train = load_digits("train")
        for k, path in enumerate(paths):
            torch.manual_seed(k)
            model = get_model("mlp", in_features=64, num_classes=10, hidden=(128, 128))
            train_model(model, train, epochs=epochs, seed=k, device="cpu")
            save_checkpoint(model, path)
    if dist.is_initialized():
        dist.barrier()  # the other ranks wait for the checkpoints
    return [load_model(p)[0] for p in paths]


def main():
    args = parse_args()
    rank, world_size, device = setup(args.device)
    try:
        models = build_models(Path(args.models_dir), args.n_models, args.epochs, rank)

        # Each rank takes its own contiguous shard of the alignment inputs.
        # (With a Dataset, DistributedSampler(dataset, shuffle=False) works too
        # when len(dataset) is divisible by the world size: otherwise it pads
        # with repeated samples, which then count twice.)
        inputs = load_digits("train").tensors[0]
        shard = torch.tensor_split(inputs, world_size)[rank]

        merger = ModelMerger(models, CCAAligner(), device=device, batch_size=args.batch_size)
        merger.fit(shard)  # statistics and BatchNorm re-estimation are all-reduced inside

        if rank == 0:
            test = load_digits("test")
            for k, model in enumerate(models):
                print(f"model {k}: accuracy {evaluate(model, test)['accuracy']:.3f}")
            merged = evaluate(merger.merged_model_, test, device=device)["accuracy"]
            print(f"merged ({world_size} process(es), {len(shard)} samples on rank 0): "
                  f"accuracy {merged:.3f}")
            if args.out:
                state = {k: v.cpu() for k, v in merger.merged_model_.state_dict().items()}
                torch.save(state, args.out)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
