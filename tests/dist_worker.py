"""One process of the torch.distributed tests (tests/test_distributed.py): run alone, or
under torchrun with any world size. Samples a seed range into shards through the CLI,
computes the sharded digits FD and a sharded Lipschitz probe, and (rank 0) saves what it
got into OUT/result-w{world}.pt for the test to compare across world sizes.

    python tests/dist_worker.py OUT SAMPLES_DIR
"""
import os
import sys

import torch

torch.set_num_threads(1)

from fastdiff import cli, distributed as dist  # noqa: E402
from fastdiff.metrics import digits_fd_sharded, sharded_moments  # noqa: E402


def main(out, samples):
    dist.init()
    assert cli.main(["sample", "--seeds", "0-22", "--batch", "4", "--steps", "4", "--out", samples,
                     "--pack", "--no-progress", "--json"]) == 0
    data = dist.load_shards(samples)
    x = torch.from_numpy(data["arr_0"]).permute(0, 3, 1, 2).double() * (2.0 / 255.0) - 1.0
    shards = list(x.split(4))  # the shards (batch 4), dealt to the ranks
    fd = digits_fd_sharded(shards[dist.rank_slice(len(shards))])
    moments = sharded_moments(shards[dist.rank_slice(len(shards))])
    # A probe whose chunks do not divide evenly among 2 or 3 ranks.
    from fastdiff import NoiseSchedule, lipschitz_t, pretrained
    model, _ = pretrained("digits")
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 1, 8, 8, generator=gen)
    noise = torch.randn(3, 1, 8, 8, generator=gen)
    labels = torch.tensor([1, 4, 7])
    res = lipschitz_t(model, x0, NoiseSchedule.linear(), torch.arange(0, 60, 3), method="fd",
                      noise=noise, batch_size=7, progress=False,
                      model_kwargs={"class_labels": labels})
    if dist.rank() == 0:
        torch.save({"fd": fd, "moments": moments, "probe": res.values, "images": data["arr_0"], "labels": data["arr_1"],
                    "world": dist.world_size()},
                   os.path.join(out, f"result-w{dist.world_size()}.pt"))
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
