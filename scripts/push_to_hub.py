"""Release an EntmaxViT checkpoint on the Hugging Face Hub: assemble, verify in a fresh process, upload.

    python scripts/push_to_hub.py RUN/final_model --repo-id OWNER/NAME \\
        --results knn.json seg_voc.json --seg-head seg_voc/segmentation_head
    python scripts/push_to_hub.py RUN/final_model --output-dir hub_repo          # offline: assemble + verify only
    python scripts/push_to_hub.py RUN/final_model --repo-id OWNER/NAME --create-pr --revision dev

The repository gets the safetensors weights, config.json with auto_map (AutoConfig, AutoModel, AutoBackbone)
and ``custom_pipelines`` (our image-feature-extraction pipeline, plus image-segmentation with --seg-head), the
flat modeling files, preprocessor_config.json, the pipeline code, the segmentation head (with --seg-head), the
results files and a generated README.md card. Name the task when loading:
``pipeline("image-segmentation", model=repo, trust_remote_code=True)``; with two custom tasks,
``pipeline(model=repo, ...)`` without one raises (transformers cannot pick). Everything goes up in ONE commit
(or one PR). Token: HF_TOKEN or `hf auth login`. Options may be written --repo-id or --repo_id; any option can
also come from a YAML file via --config FILE; ``--results`` takes several files.
"""

import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

from entmax_vit.cli import entry_point
from entmax_vit.data.config_io import ConfigError, save_config


@dataclass
class PushConfig:
    # save_pretrained folder of an EntmaxViTModel (e.g. RUN/final_model); also the first positional argument.
    model_dir: str = ""
    # OWNER/NAME on the Hub; the card's usage snippets name it. Without it the folder is only assembled.
    repo_id: Optional[str] = None
    # Results JSON files (schema entmax_vit.results/v1) for the card's evaluation table and model-index.
    results: list[str] = field(default_factory=list)
    # Folder with segmentation_head.safetensors + .json: ships the probe and the segmentation pipeline.
    seg_head: Optional[str] = None
    # Create the repository private; an existing public repository is refused (create_repo cannot change it).
    private: bool = False
    # Open a pull request instead of committing to the branch.
    create_pr: bool = False
    # Branch to commit to (created from main when missing), or an open PR's refs/pr/N; default main.
    revision: Optional[str] = None
    # Where to assemble the repository (kept). Default: a temporary folder, deleted after the upload.
    output_dir: Optional[str] = None
    # Upload? None = yes when --repo-id is given and HF_HUB_OFFLINE is not set; false = assemble only.
    upload: Optional[bool] = None
    # License identifier for the card metadata.
    license: str = "apache-2.0"
    # Commit / PR title (default names the file count).
    commit_message: Optional[str] = None
    # Load the assembled folder in a fresh process with trust_remote_code and compare outputs (recommended).
    verify: bool = True
    # Measure attention sparsity on bundled photographs for the card.
    measure_sparsity: bool = True
    # Replace a non-empty --output-dir.
    overwrite: bool = False


def main(cfg: PushConfig) -> dict:
    from entmax_vit.hub_release.assemble import assemble_repository
    from entmax_vit.hub_release.upload import should_upload, upload_repository, work_folder

    if not cfg.model_dir:
        raise ConfigError("Give the model folder: push_to_hub.py MODEL_DIR [--repo-id OWNER/NAME] ...")
    upload = should_upload(cfg.upload, cfg.repo_id, cfg.output_dir)
    with work_folder(cfg.output_dir, "entmax_vit_hub_") as folder:
        assembled = assemble_repository(cfg.model_dir, folder, repo_id=cfg.repo_id, results=cfg.results,
                                        seg_head=cfg.seg_head, license=cfg.license, measure=cfg.measure_sparsity,
                                        verify=cfg.verify, overwrite=cfg.overwrite)
        summary = {"folder": str(folder) if cfg.output_dir else None, "files": assembled.files,
                   "sparsity": assembled.sparsity.to_dict() if assembled.sparsity else None,
                   "verification": asdict(assembled.verification) if assembled.verification else None,
                   "upload": None}
        records = folder / ".push"  # hidden: kept locally, never uploaded
        save_config(cfg, records / "push_config.yaml")
        if upload:
            result = upload_repository(folder, cfg.repo_id, private=cfg.private, create_pr=cfg.create_pr,
                                       revision=cfg.revision, commit_message=cfg.commit_message)
            summary["upload"] = dict(result.__dict__)
        (records / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"[push_to_hub] {len(summary['files'])} files: {', '.join(summary['files'])}")
    if summary["sparsity"]:
        s = summary["sparsity"]
        print(f"[push_to_hub] attention {s['attention']}: {100 * s['mean_zero_fraction']:.1f}% exact zeros, "
              f"{s['mean_support']:.1f}/{s['num_tokens']} keys per query")
    if summary["verification"]:
        v = summary["verification"]
        segments = {True: "matches", False: "DIFFERS", None: "n/a"}[v["segments_match"]]
        print(f"[push_to_hub] fresh-process check passed: max |diff| {max(v['max_abs_diff'].values()):.1e}, "
              f"segmentation {segments}")
    if summary["folder"]:
        print(f"[push_to_hub] assembled repository: {summary['folder']}")
    if summary["upload"]:
        u = summary["upload"]
        print(f"[push_to_hub] uploaded to {u['repo_url']} ({u['revision']}): {u['pr_url'] or u['commit_url']}")
    return summary


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """Command line -> exit status: 0, or 2 with the message on stderr (bad options, missing inputs)."""
    return entry_point.exit_status(main, PushConfig, "push_to_hub", argv=argv, positionals=("model_dir",),
                                   model_fields=("model_dir",), description=__doc__,
                                   log_format="%(asctime)s %(name)s %(levelname)s %(message)s")


if __name__ == "__main__":
    sys.exit(cli())
