"""The training set of a built-in setting: loaded from --data or rebuilt by retrack.data, and the
description dataset.json records so that retrack.builtin rebuilds and verifies the identical set."""

from __future__ import annotations

import argparse

import numpy as np

from retrack.builtin import rebuild_dataset
from retrack.data import (CLASS_NAMES, DATASET_VERSION, MNIST_TSHIRT_VERSION, TSHIRT_LABEL, BuiltinDataset,
                          dataset_fingerprint, tshirt_copy_count)

# The builder in retrack.data of each setting, by the name dataset.json records.
BUILDERS = {"v1": "retrack.data.build_digits_tshirt", "v2": "retrack.data.build_mnist_tshirt"}


def builder_arguments(args: argparse.Namespace) -> dict:
    """The keyword arguments of the setting's dataset builder in retrack.data."""
    if args.setting == "v2":
        return {"seed": args.seed, "n_tshirt": args.n_tshirt}
    return {"seed": args.seed, "n_digits": args.n_digits, "tshirt_fraction": args.tshirt_fraction}


def load_dataset(args: argparse.Namespace) -> BuiltinDataset:
    """The training set: from --data when given, else rebuilt (and cached) by retrack.data."""
    if args.data is None:
        return rebuild_dataset({"builder": BUILDERS[args.setting], **builder_arguments(args)})
    with np.load(args.data) as stored:
        images, labels, tshirt = stored["images"], stored["labels"], stored["tshirt"]
    expected = (5000 + args.n_tshirt if args.setting == "v2"
                else args.n_digits + tshirt_copy_count(args.n_digits, args.tshirt_fraction))
    if len(images) != expected:
        raise SystemExit(f"{args.data} holds {len(images)} images, but the {args.setting} parameters "
                         f"{builder_arguments(args)} make {expected}: pass the parameters it was built with")
    return BuiltinDataset(images=images, labels=labels, is_forget=labels == TSHIRT_LABEL, tshirt=tshirt)


def dataset_description(args: argparse.Namespace, dataset: BuiltinDataset) -> dict:
    """What dataset.json records: enough for retrack.builtin to rebuild and verify the set."""
    arguments = builder_arguments(args)
    builder = BUILDERS[args.setting]
    return {
        "builder": builder,
        "call": f"{builder}({', '.join(f'{k}={v}' for k, v in arguments.items())})",
        "dataset_version": MNIST_TSHIRT_VERSION if args.setting == "v2" else DATASET_VERSION,
        **arguments,
        "n_images": int(len(dataset)),
        "n_forget": int(dataset.is_forget.sum()),
        "image_size": int(dataset.images.shape[-1]),
        "class_names": list(CLASS_NAMES),
        "fingerprint": dataset_fingerprint(dataset.images),
    }
