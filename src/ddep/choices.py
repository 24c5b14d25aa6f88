"""Error messages: unknown names and options with the closest valid spelling suggested, and
lists of files cut short."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


#: What other libraries call a setting (timm, mmsegmentation, segmentation_models_pytorch, Hugging Face
#: Trainer, Lightning): each name -> ours, as the last part of a config key or an option name, in order of
#: preference (a name with a dot is one whole key). A name listed here that a command has no key for gets
#: no suggestion rather than a wrong one.
SYNONYMS: dict[str, tuple[str, ...]] = {
    name: ours for names, ours in (
        ("num_classes n_classes num_class nclass nclasses classes num_labels n_cls", ("num_classes", "classes")),
        ("class_names names classnames label_names id2label", ("class_names", "classes_file")),
        ("lr learning_rate base_lr max_lr init_lr initial_lr lr0", ("lr",)),
        ("steps max_steps max_iters max_iter iters iterations num_steps total_steps train_steps num_iters "
         "total_iters num_training_steps", ("steps",)),
        ("epochs epoch max_epochs num_epochs n_epochs num_train_epochs total_epochs", ("epochs",)),
        ("batch_size batch bs samples_per_gpu imgs_per_gpu batch_size_per_gpu train_batch_size "
         "per_device_train_batch_size", ("batch_size",)),
        ("num_workers workers n_workers workers_per_gpu dataloader_num_workers", ("num_workers",)),
        ("weight_decay wd", ("weight_decay",)),
        ("warmup warmup_steps warmup_iters warmup_iter num_warmup_steps warmup_epochs", ("warmup_steps",)),
        ("min_lr lr_min eta_min final_lr", ("min_lr_ratio",)),
        ("crop crop_size img_size image_size input_size size resolution", ("crop_size",)),
        ("resume resume_from resume_from_checkpoint auto_resume", ("resume",)),
        ("optimizer opt optimizer_name", ("optim.name",)),
        ("clip_grad clip_grad_norm grad_clip max_grad_norm gradient_clip_val clip_norm", ("clip_grad_norm",)),
        ("grad_accum accumulate_grad_batches gradient_accumulation_steps accum_iter accum_steps accumulation_steps",
         ("grad_accum",)),
        ("amp precision mixed_precision fp16 bf16 use_amp", ("amp",)),
        ("checkpoint init load_from init_from ckpt checkpoint_path model_path", ("init", "checkpoint")),
        ("weights", ("init", "checkpoint", "encoder_weights")),
        ("pretrained encoder_weights backbone_weights", ("encoder_weights",)),
        ("encoder backbone encoder_name", ("encoder",)),
        ("arch architecture model_name", ("arch",)),
        ("out_dir output_dir work_dir log_dir logdir save_dir outdir", ("out_dir", "output")),
        ("eval_every val_interval eval_interval eval_steps val_check_interval eval_freq evaluation_interval",
         ("eval_every",)),
        ("checkpoint_every save_steps save_interval checkpoint_interval ckpt_interval save_every save_freq",
         ("checkpoint_every",)),
        ("log_every log_interval logging_steps log_freq print_freq", ("log_every",)),
        ("seed random_seed manual_seed", ("seed",)),
        ("device gpu gpus devices", ("device",)),
        ("root data_root dataset_root data_dir root_dir data_path", ("root", "input")),
        ("dataset dataset_name dataset_type", ("dataset",)),
        ("std sigma noise_std noise_sigma", ("std",)),
    ) for name in names.split()
}


def _shared(a: list[str], b: list[str]) -> int:
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


def closest_key(name: str, keys: Iterable[str]) -> str | None:
    """The one key of ``keys`` (dotted config keys, or option names) that ``name`` most likely means,
    or None: a key with the same last part anywhere (``lr`` -> ``optim.lr``), then one that another
    library's name stands for (:data:`SYNONYMS`: ``max_iters`` -> ``steps``), then a close spelling.
    Among keys that fit alike, the one in the section typed wins (``eval.crop`` -> ``eval.crop_size``),
    then the first listed."""
    keys = [key for key in keys if key != name]
    parts = name.split(".")
    leaf, section = parts[-1].lower().replace("-", "_"), parts[:-1]

    def best(found: list[str]) -> str:
        return max(found, key=lambda key: _shared(key.split(".")[:-1], section))  # max keeps the first of equals

    for target in (leaf, *SYNONYMS.get(leaf, ())):
        found = [key for key in keys if (key == target if "." in target else key.rsplit(".", 1)[-1] == target)]
        if found:
            return best(found)
    if leaf in SYNONYMS:
        return None
    close = difflib.get_close_matches(name, keys, n=1)
    if close:
        return close[0]
    by_leaf: dict[str, list[str]] = {}
    for key in keys:
        by_leaf.setdefault(key.rsplit(".", 1)[-1], []).append(key)
    close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
    return best(by_leaf[close[0]]) if close else None


def did_you_mean(value: object, choices: Iterable[str], *, keys: bool = False) -> str:
    """``"; did you mean 'x'?"`` or ``""``. ``keys``: ``choices`` are config keys or option names, and
    ``value`` is matched as :func:`closest_key` does (last parts, other libraries' names)."""
    if keys:
        close = closest_key(str(value), choices)
        return f"; did you mean {close!r}?" if close else ""
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_choice(what: str, value: object, choices: Iterable[str]) -> None:
    """Raise ``ValueError("unknown <what> 'x' (known: a, b); did you mean 'a'?")`` unless valid."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r} (known: {', '.join(choices)}){did_you_mean(value, choices)}")


def check_options(what: str, options: Iterable[str], valid: Iterable[str]) -> None:
    """Raise ``ValueError("unknown option 'x' for <what>; did you mean 'y'?")`` for the first bad key."""
    valid = list(valid)
    for key in options:
        if key not in valid:
            hint = did_you_mean(key, valid, keys=True) or f" (valid: {', '.join(valid) or 'none'})"
            raise ValueError(f"unknown option {key!r} for {what}{hint}")


def listed(items: list[str], shown: int = 3) -> str:
    """``a, b, c and 4 more``: the first ``shown`` of ``items``."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more
