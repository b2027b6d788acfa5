"""Is the input pipeline fast enough? Data samples/s beside the model's training samples/s, in one run.

    python tool/benchmark_data.py --config CFG [KEY VALUE ...] [--seconds S] [--max-batch B] [--device DEV]

Measures, for about S seconds each:

* ``data_single_process``: training samples/s through the full chain (SegDataset on cfg.train_list reading
  and decoding the files, then build_train_transform(cfg)) in this process;
* ``data_loader``: samples/s of a DataLoader over the same dataset with cfg.workers workers and
  cfg.batch_size (the first batch, which includes worker start-up, is not timed);
* ``model_train``: samples/s of forward + backward + SGD step of build_model(cfg) in train mode on random
  cfg.train_h x cfg.train_w crops, batch min(cfg.batch_size, --max-batch), loss main + aux_weight x aux
  as in training, with cfg.precision autocast and cfg.channels_last.

Prints one JSON object; ``ratio`` = data_loader / model_train (>= 1: the loader keeps up with the model;
< 1: training waits for data; add workers). Both are measured separately, so in a real run the loader
workers also compete with the model for CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from util.config import ConfigError, load_cfg  # noqa: E402
from util.dataset import DataError, SegDataset  # noqa: E402
from util.transforms import build_train_transform  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML config")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per measurement (default 10)")
    parser.add_argument("--max-batch", type=int, default=4,
                        help="cap on the model benchmark's batch size (default 4; cfg.batch_size otherwise)")
    parser.add_argument("--device", default=None, help="device for the model (default: cfg.device, else auto)")
    args, overrides = parser.parse_known_args(argv)
    unknown_flags = [o for o in overrides if o.startswith("--")]
    if unknown_flags:
        parser.error(f"unknown option(s) {unknown_flags}; config overrides are given as KEY VALUE")
    if args.seconds <= 0 or args.max_batch < 1:
        parser.error("--seconds must be > 0 and --max-batch >= 1")
    return args, overrides


def build_dataset(cfg) -> SegDataset:
    if not cfg.train_list:
        raise DataError("the config has no train_list to benchmark")
    return SegDataset("train", cfg.data_root, cfg.train_list, transform=build_train_transform(cfg),
                      seed=cfg.manual_seed, num_classes=cfg.classes, ignore_label=cfg.ignore_label)


def measure_single_process(dataset: SegDataset, seconds: float) -> dict:
    count, start = 0, time.perf_counter()
    while True:
        dataset[count % len(dataset)]
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return {"samples_per_s": count / elapsed, "samples": count, "seconds": elapsed}


def measure_loader(dataset: SegDataset, workers: int, batch_size: int, seconds: float) -> dict:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         drop_last=False)
    count, batches, start = 0, 0, None
    iterator = iter(loader)
    try:
        while True:
            try:
                images, _ = next(iterator)
            except StopIteration:  # small dataset: start another pass
                iterator = iter(loader)
                continue
            if start is None:  # the first batch includes worker start-up: not timed
                start = time.perf_counter()
                continue
            count += images.shape[0]
            batches += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return {"samples_per_s": count / elapsed, "samples": count, "batches": batches,
                        "seconds": elapsed, "workers": workers, "batch_size": batch_size}
    finally:
        del iterator


def measure_model(cfg, device: torch.device, batch_size: int, seconds: float) -> dict:
    from model import build_model

    model = build_model(cfg).to(device)
    model.train()
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.base_lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    images = torch.randn(batch_size, 3, cfg.train_h, cfg.train_w, device=device).to(memory_format=memory_format)
    targets = None

    def step():
        nonlocal targets
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            logits, aux_logits = model(images)
            if targets is None:  # labels at the logits' size (smaller than the crop when zoom_factor < 8)
                targets = torch.randint(0, cfg.classes, (batch_size,) + tuple(logits.shape[-2:]), device=device)
            loss = F.cross_entropy(logits.float(), targets, ignore_index=cfg.ignore_label)
            loss = loss + cfg.aux_weight * F.cross_entropy(aux_logits.float(), targets, ignore_index=cfg.ignore_label)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()  # warm-up: allocations, cudnn autotuning
    synchronize()
    steps, start = 0, time.perf_counter()
    while True:
        step()
        synchronize()
        steps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return {"samples_per_s": steps * batch_size / elapsed, "steps": steps, "seconds": elapsed,
                    "batch_size": batch_size, "device": str(device), "crop": [cfg.train_h, cfg.train_w],
                    "precision": cfg.precision}


def run(argv=None) -> dict:
    args, overrides = parse_args(argv)
    cfg = load_cfg(args.config, overrides)
    from util.misc import select_device

    device = select_device(args.device or cfg.device)
    dataset = build_dataset(cfg)
    single = measure_single_process(dataset, args.seconds)
    loader = measure_loader(dataset, cfg.workers, cfg.batch_size, args.seconds)
    model_batch = max(1, min(cfg.batch_size, args.max_batch))
    model = measure_model(cfg, device, model_batch, args.seconds)
    return {
        "config": args.config,
        "overrides": overrides,
        "train_samples": len(dataset),
        "data_single_process": single,
        "data_loader": loader,
        "model_train": model,
        "ratio": loader["samples_per_s"] / model["samples_per_s"],
        "ratio_single_process": single["samples_per_s"] / model["samples_per_s"],
    }


def main(argv=None) -> int:
    try:
        result = run(argv)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
