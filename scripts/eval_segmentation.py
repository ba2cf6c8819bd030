"""Linear semantic-segmentation probe on a frozen backbone.

    python scripts/eval_segmentation.py --preset voc --model PATH_OR_HUB_ID --dataset SOURCE [--key value ...]
    accelerate launch scripts/eval_segmentation.py --preset ade20k_dinov2 --model ... --dataset ...

Presets (evaluation/configs): voc, ade20k, cityscapes (NeCo/Leopart protocol), voc_dinov2, ade20k_dinov2,
cityscapes_dinov2 (DINOv2 linear protocol), embedded (bundled synthetic scenes; the default).
``--preset NAME`` is an alias of ``--config NAME``; a YAML path works too. Writes OUTPUT_DIR/
results_segmentation.json, segmentation_head/ (for the Hub), per_class_iou.{json,png}, train_log.json and
the resolved config. Keys: see entmax_vit.evaluation.segmentation_probe.SegmentationEvalConfig.
"""

from entmax_vit.cli.entry_point import eval_segmentation

if __name__ == "__main__":
    eval_segmentation()
