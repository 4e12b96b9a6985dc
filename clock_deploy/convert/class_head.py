"""Class-head transfer between class lists (COCO -> KITTI on import, `model.pretrained` in training).

When the checkpoint's classes differ from the
dataset's, each class-head row of a target class starts from the row of its source class
(`model.class_map`, else the source class of the same name, case-insensitive) and the rows of
unmatched classes keep their fresh initialization (random weights, focal-prior bias).
"""
import difflib
import re

from clock_deploy.convert.common import fit_problems
from clock_deploy.errors import UserError

# parameters with one row per class: classification heads and DINO's denoising label embedding
CLASS_HEAD = re.compile(r"(^|\.)(\w*class_embed(\.\d+)?|label_enc)\.(weight|bias)$")


def match_classes(target_classes, source_classes, class_map):
    """Source index (or None) for every target class, following `class_map` then equal names."""
    by_name = {}
    for i, name in enumerate(source_classes):
        by_name.setdefault(name.lower(), i)
    sources = []
    for target in target_classes:
        if target in class_map:
            name = class_map[target]
            if name is None:
                sources.append(None)
                continue
            if name.lower() not in by_name:
                hint = difflib.get_close_matches(name, source_classes, n=1)
                extra = f" (did you mean '{hint[0]}'?)" if hint else ""
                raise UserError(f"model.class_map.{target}: '{name}' is not a class of the pretrained "
                                f"checkpoint{extra}")
            sources.append(by_name[name.lower()])
        else:
            sources.append(by_name.get(target.lower()))
    return sources


def transfer_state(own_state, source_state, target_classes, source_classes, class_map):
    """The model's new state dict: source weights everywhere, class-head rows remapped.

    Returns (state, report lines). Keys or shapes that do not fit raise UserError.
    """
    same_classes = list(target_classes) == list(source_classes)
    heads = [k for k in own_state if CLASS_HEAD.search(k)] if not same_classes else []
    problems = fit_problems(own_state, source_state, skip_shapes=heads)  # the heads' rows are checked below
    if problems:
        raise UserError(f"model.pretrained: the checkpoint's weights do not fit the configured model ({problems})")
    state = {k: source_state[k] for k in own_state}
    if same_classes:
        return state, [f"class head: kept (same classes {list(target_classes)})"]

    sources = match_classes(target_classes, source_classes, class_map)
    n_target, n_source = len(target_classes), len(source_classes)
    for key in heads:
        new, old = own_state[key].clone(), source_state[key]
        extra = old.shape[0] - n_source  # rows after the classes (e.g. a "no class" embedding) carry over
        if extra < 0 or new.shape[0] - n_target != extra or new.shape[1:] != old.shape[1:]:
            raise UserError(f"model.pretrained: '{key}' has shape {tuple(old.shape)} in the checkpoint, "
                            f"which does not fit its {n_source} classes")
        for row, src in enumerate(sources):
            if src is not None:
                new[row] = old[src]
        new[n_target:] = old[n_source:]
        state[key] = new
    lines = [f"class head ({len(heads)} tensors) from {n_source} to {n_target} classes:"]
    lines += [f"  {target} <- {source_classes[src] if src is not None else '(random init)'}"
              for target, src in zip(target_classes, sources)]
    return state, lines
