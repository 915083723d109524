"""Runs INSIDE the clip-benchmark peer venv: CLIP_benchmark's own zero-shot code on a given model + images.

Input: a JSON job file (model config dir, model name, checkpoint, image paths + labels,
class names, templates, batch size, amp). Output: a JSON file with CLIP_benchmark's metrics
and an .npy of its logits, for bench/eval_parity.py to compare with laion_tasks.
Only the image list plumbing is ours (a minimal Dataset with ``.classes``); the classifier,
the classification loop and the metrics are ``clip_benchmark.metrics.zeroshot_classification``.
"""

import json
import sys
import time

import numpy as np
import open_clip
import torch
from clip_benchmark.metrics import zeroshot_classification as zsc
from PIL import Image


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items, classes, transform):
        self.items = items
        self.classes = classes
        self.transform = transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        with Image.open(path) as img:
            return self.transform(img.convert("RGB")), label


def main(job_path: str) -> None:
    job = json.load(open(job_path))
    torch.set_num_threads(job.get("threads", torch.get_num_threads()))
    open_clip.add_model_config(job["model_config_dir"])
    model, _, preprocess = open_clip.create_model_and_transforms(job["model"], pretrained=job["checkpoint"], device="cpu")
    model.eval()
    tokenizer = open_clip.get_tokenizer(job["model"])
    dataset = ListDataset(job["items"], job["classnames"], preprocess)
    loader = torch.utils.data.DataLoader(dataset, batch_size=job["batch_size"], shuffle=False, num_workers=0)
    t0 = time.perf_counter()
    classifier = zsc.zero_shot_classifier(model, tokenizer, job["classnames"], job["templates"], "cpu", amp=job["amp"])
    t1 = time.perf_counter()
    logits, target = zsc.run_classification(model, classifier, loader, "cpu", amp=job["amp"])
    t2 = time.perf_counter()
    clf_path = job["out_prefix"] + ".clf.pt"
    torch.save(classifier, clf_path)
    metrics = zsc.evaluate(model, loader, tokenizer, job["classnames"], job["templates"], "cpu", amp=job["amp"], load_clfs=[clf_path])
    np.save(job["out_prefix"] + ".logits.npy", logits.numpy())
    np.save(job["out_prefix"] + ".target.npy", target.numpy())
    json.dump(
        {
            "metrics": {k: float(v) for k, v in metrics.items()},
            "classifier_s": t1 - t0,
            "images_s": t2 - t1,
            "open_clip": open_clip.__version__,
        },
        open(job["out_prefix"] + ".json", "w"),
    )


if __name__ == "__main__":
    main(sys.argv[1])
