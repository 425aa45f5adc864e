"""A real diffusers pipeline loop: its own scheduler vs fastdiff.FusedScheduler, side by side.

A tiny random StableDiffusionPipeline (a small UNet2DConditionModel built from a config,
prompt_embeds instead of a text encoder) runs txt2img with classifier-free guidance
(7.5) at a few latent sizes, once with the diffusers scheduler (swapped in with
``Cls.from_config(pipe.scheduler.config)``) and once after ``fastdiff.fuse(pipe)``. For
each family and size the table gives the median over repeats of

  * the time per step inside the scheduler's ``scale_model_input`` and ``step``, measured
    in the pipeline's loop (between two UNet calls);
  * the time per step outside the UNet: the gap between two UNet calls (the pipeline's own
    per-step work, CFG batch and guidance, plus the scheduler's);
  * the whole call's time (with the one-offs: ``set_timesteps``, prompt handling);

(on CPU as the thread's CPU time, so that other processes on a shared machine do not
count; on CUDA as synchronised wall time), with the ratios diffusers / fused (> 1: the fused scheduler is faster), and the max abs
difference of the output latents (a parity check, not a timing).

    python benchmarks/bench_pipeline.py                        # sizes 16,32,64, 20 steps
    python benchmarks/bench_pipeline.py --sizes 32 --repeats 3 --json out/bench_pipeline.json
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

import diffusers
import fastdiff

# Stable Diffusion 1.x's scheduler config (its scheduler_config.json).
SD_CONFIG = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
FAMILIES = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m-k": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpm++2s": ("DPMSolverSinglestepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
}


def tiny_pipeline(device):
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, attention_head_dim=2, cross_attention_dim=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                                  norm_num_groups=4)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet,
        scheduler=diffusers.PNDMScheduler.from_config(SD_CONFIG), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Clock:
    """Records (start, end) of every call of some methods of an object (device-
    synchronised), wrapped on the instance with their signatures kept (pipelines inspect
    them)."""

    def __init__(self, obj, names, device):
        self.obj, self.names, self.device = obj, names, device
        self.spans = []
        self.now = _clock(device)
        for name in names:
            setattr(obj, name, self._wrap(getattr(obj, name)))

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _wrap(self, fn):
        @functools.wraps(fn)
        def timed_call(*args, **kwargs):
            self._sync()
            start = self.now()
            out = fn(*args, **kwargs)
            self._sync()
            self.spans.append((start, self.now()))
            return out
        return timed_call

    def close(self):
        for name in self.names:
            delattr(self.obj, name)  # back to the class's method


def _clock(device):
    # On CPU (one thread) the thread's CPU time: what the step costs, without the time
    # slices other processes take on a shared machine. On CUDA wall time (synchronised).
    return time.thread_time if device.type == "cpu" else time.perf_counter


def timed(pipe, inputs, steps, repeats, warmup, device):
    """Medians of (seconds in the scheduler between two UNet calls, seconds outside the
    UNet between two UNet calls, seconds per whole call), and the latents. Per-step
    medians are over every gap between consecutive UNet calls of all timed calls, so a
    time slice lost to another process inflates one gap, not the result."""
    sched, outside, whole, out = [], [], [], None
    for i in range(warmup + repeats):
        unet = Clock(pipe.unet, ["forward"], device)
        clock = Clock(pipe.scheduler, ["scale_model_input", "step"], device)
        try:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = unet.now()
            out = pipe(**inputs(), num_inference_steps=steps, guidance_scale=7.5, output_type="latent").images
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            total = unet.now() - start
        finally:
            unet.close()
            clock.close()
        if i < warmup:
            continue
        whole.append(total)
        calls = unet.spans
        for (_, end), (nxt, _) in zip(calls, calls[1:]):
            outside.append(nxt - end)
            sched.append(sum(b - a for a, b in clock.spans if end <= a and b <= nxt))
    return statistics.median(sched), statistics.median(outside), statistics.median(whole), out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="16,32,64", help="latent sizes (H = W), comma-separated")
    p.add_argument("--batch", type=int, default=1, help="images per call (the UNet sees twice as many)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5, help="timed calls (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--families", default=",".join(FAMILIES), help="subset of " + ", ".join(FAMILIES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = [int(v) for v in args.sizes.split(",") if v.strip()]
    names = [n.strip() for n in args.families.split(",") if n.strip()]
    for n in names:
        if n not in FAMILIES:
            p.error(f"unknown family {n!r}; choose from {', '.join(FAMILIES)}")
    torch.manual_seed(0)
    pipe = tiny_pipeline(device)
    emb = torch.randn(args.batch, 5, 16, device=device)
    neg = torch.randn(args.batch, 5, 16, device=device)
    print(f"fastdiff {fastdiff.__version__} | torch {torch.__version__} | diffusers {diffusers.__version__} | "
          f"device {device} | threads {args.threads} | batch {args.batch} (CFG 7.5: UNet batch "
          f"{2 * args.batch}) | {args.steps} steps | median of {args.repeats} (warm-up {args.warmup})")
    header = (f"{'family':<10} {'latent':>6} | {'scheduler us/call':>25} | {'outside UNet us/call':>25} | "
              f"{'whole call ms':>22} | {'max|diff|':>9}")
    sub = (f"{'':<10} {'':>6} | {'diffusers':>9} {'fused':>7} {'ratio':>7} | {'diffusers':>9} {'fused':>7} "
                 f"{'ratio':>7} | {'diffusers':>9} {'fused':>6} {'ratio':>5} |")
    print(header)
    print(sub)
    print("-" * len(header))
    rows = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for size in sizes:
            latents = torch.randn(args.batch, 4, size, size, device=device)

            def inputs():
                return dict(prompt_embeds=emb, negative_prompt_embeds=neg, latents=latents.clone(),
                            generator=torch.Generator(device).manual_seed(0))
            for name in names:
                cls, config = FAMILIES[name]
                pipe.scheduler = getattr(diffusers, cls).from_config(SD_CONFIG, **config)
                d_sch, d_out, d_whole, x_d = timed(pipe, inputs, args.steps, args.repeats, args.warmup, device)
                fastdiff.fuse(pipe)
                f_sch, f_out, f_whole, x_f = timed(pipe, inputs, args.steps, args.repeats, args.warmup, device)
                row = {"family": name, "scheduler": cls, "latent": size, "batch": args.batch,
                       "steps": args.steps, "device": str(device),
                       "diffusers_scheduler_us": d_sch * 1e6, "fused_scheduler_us": f_sch * 1e6,
                       "scheduler_ratio": d_sch / f_sch,
                       "diffusers_outside_us": d_out * 1e6, "fused_outside_us": f_out * 1e6,
                       "outside_ratio": d_out / f_out, "diffusers_call_ms": d_whole * 1e3,
                       "fused_call_ms": f_whole * 1e3, "call_ratio": d_whole / f_whole,
                       "max_abs_diff": (x_d.float() - x_f.float()).abs().max().item(),
                       "latent_scale": x_d.float().abs().max().item()}
                rows.append(row)
                print(f"{name:<10} {size:>6} | {d_sch * 1e6:>9.1f} {f_sch * 1e6:>7.1f} {row['scheduler_ratio']:>6.1f}x | "
                      f"{d_out * 1e6:>9.1f} {f_out * 1e6:>7.1f} {row['outside_ratio']:>6.2f}x | "
                      f"{d_whole * 1e3:>9.1f} {f_whole * 1e3:>6.1f} {row['call_ratio']:>4.2f}x | "
                      f"{row['max_abs_diff']:>9.1e}")
    print("Medians over the gaps between consecutive UNet calls: scheduler = microseconds inside "
          "scale_model_input + step; outside UNet = the whole gap (the pipeline's own per-step work + "
          "the scheduler). Ratios: diffusers' time over the fused scheduler's.")
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".json", dir=folder)
        with os.fdopen(fd, "w") as f:
            json.dump({"config": vars(args), "results": rows}, f, indent=2)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")
    return 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


if __name__ == "__main__":
    sys.exit(main())
