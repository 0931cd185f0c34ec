"""c06 model card: the Markdown card written into every bundle."""

from __future__ import annotations

import logging
from typing import Any

from metal_defect.serving import explain
from metal_defect.serving.bundle import ServingSpec

log = logging.getLogger(__name__)


def model_card(name: str, result: dict[str, Any], test: dict[str, Any] | None, calibration: dict[str, Any], spec: ServingSpec,
               ingestion: dict[str, Any], pre: dict[str, Any], train_info: dict[str, Any], gate: dict[str, Any], verdicts: dict[str, Any]) -> str:
    """A Markdown model card: data, split, model, metrics with intervals, calibration, known limits.

    `ingestion` and `pre` are the ingestion and preprocessing reports. One long template on
    purpose: the card reads top to bottom here as it does on the page.
    """
    valid = result["valid"]

    def line(label: str, r: dict[str, Any]) -> str:
        lo, hi = r["accuracy_ci95"]
        return (f"| {label} | {r['n']} | {r['errors']} | {r['accuracy']:.2%} ({lo:.1%}–{hi:.1%}) | {r['macro_f1']:.4f} | "
                f"{r['calibration']['ece']:.4f} ({r['calibration']['ece_ci95'][0]:.4f}–{r['calibration']['ece_ci95'][1]:.4f}) |")

    per_class = test["per_class"] if test else valid["per_class"]
    rows = "\n".join(f"| {c} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |" for c, v in per_class.items())
    counts = "; ".join(f"{s}: {sum(v.values())}" for s, v in pre["counts"].items())

    def yardstick(label: str, r: dict[str, Any], key: str = "") -> str:
        ci = gate.get("lead_ci95", {}).get(key)
        lead = f"{gate['lead'][key]:+.4f} ({ci[0]:+.4f} to {ci[1]:+.4f})" if ci else ""
        return f"| {label} | {r['accuracy']:.2%} | {r['macro_f1']:.4f} ({r['macro_f1_ci95'][0]:.4f}–{r['macro_f1_ci95'][1]:.4f}) | {lead} |"

    verdict = ("**WEAK MODEL** — do not trust its answers before the data is checked:\n" + "\n".join(f"- {r}" for r in gate["reasons"])
               if gate["weak_model"] else f"Passed{': ' + gate['note'] if gate.get('note') else ': clearly better than the texture and majority baselines below'}.")
    train_acc = gate["train_accuracy"]
    return f"""# Model card: {name}

Created {spec.created}.

## Quality gate
{verdict}

On the {gate['split']} split (n={gate['n']}); accuracy on its own training images {f"{train_acc:.3f}" if train_acc is not None else "n/a"}.

| | accuracy | macro F1 (95% bootstrap CI) | the model's lead (paired 95% CI) |
|---|---|---|---|
{yardstick(name, gate['model'])}
{yardstick('classical baseline: LBP + gradient histograms, RBF SVM', gate['classical'], 'classical')}
{yardstick('plain multi-scale LBP baseline: LBP histograms at radii 1-3, RBF SVM', gate['plain_lbp'], 'plain_lbp') if 'plain_lbp' in gate else ''}
{yardstick(f"majority class ('{gate['majority']['class']}')", gate['majority'])}

## Data
- Source: `{ingestion['source']}` ({ingestion['source_kind']}, {ingestion['layout']} layout), {ingestion['images_found']} images found,
  {ingestion['skipped_count']} files skipped at ingestion, {len(pre['skipped'])} unusable at decoding,
  {sum(len(d['dropped']) for d in pre['duplicates'])} exact duplicates dropped.
- Classes (label order): {', '.join(spec.class_names)}.
- Split ({'kept from the source' if pre['presplit'] else 'stratified, seeded'}): {counts}.
- Input contract: {spec.image_size}×{spec.image_size} {spec.color_mode}, uint8 pixels, non-square images {'padded (aspect ratio kept)' if spec.resize == 'pad' else 'stretched'}; resizing and mode conversion by
  `to_model_input` (the same function for training and serving); normalisation inside the model.

## Model
- Architecture: `{name}`, {train_info['parameters']['total']:,} parameters{_macs(train_info['parameters'])}.
- Weights: {'pretrained (' + str(train_info['weights']) + ')' if train_info['pretrained'] else 'random initialisation (pretrained: false)'};
  schedule: {train_info['schedule']} ({', '.join(train_info['phases'])}), {train_info['epochs_run']} epochs,
  median {train_info['median_epoch_seconds']} s/epoch; strategy {train_info['strategy']} × {train_info['replicas']}.
- Chosen on validation macro F1 (ties: validation log loss) among the trained base models; test touched once.

## Metrics
| split | n | errors | accuracy (95% Wilson CI) | macro F1 | ECE (95% bootstrap CI) |
|---|---|---|---|---|---|
{line('validation (before temperature: it was fitted here)', valid)}
{line('test', test) if test else '| test | - | - | (no test split) | - | - |'}

Per class ({'test' if test else 'validation'}):

| class | precision | recall | F1 | support |
|---|---|---|---|---|
{rows}

## Calibration
Temperature fitted on validation: T = {calibration['fitted_temperature']:.3f}
({'stored with the model' if calibration['used'] else 'not stored: it did not lower validation NLL'}{'; ' + calibration['reason'] if calibration.get('reason') else ''});
validation NLL {calibration['valid_nll_before']:.4f} → {calibration['valid_nll_after']:.4f},
validation ECE {calibration['valid_ece_before']:.4f} → {calibration['valid_ece_after']:.4f}.
Test ECE above is with the stored temperature{'' if not test else f"; without it {test['calibration_uncalibrated']['ece']:.4f}"}.

{_pointing_text(test.get("pointing") if test else None)}## Verdicts: "uncertain" and "out of distribution"
{_verdict_text(spec, verdicts)}

## Known limits
- Trained only on the images above: {len(spec.class_names)} classes; an image of anything else (another defect type, another
  material, another camera or lighting) still gets one of these labels, often with high confidence.
- The test split is small: the interval above, not the point estimate, is what the data supports.
- Calibration was fitted and checked on small splits; confidences near 1.0 are the least certain part of it.
- The out-of-distribution check is fitted to these training images and catches many unlike images, not all: on NEU it
  flagged about a third of grey X-SDD steel images (other defects on other steel) and nearly all blank, noise, photograph
  and inverted images (README, `bench ood`).
- Images are reduced to {spec.image_size}×{spec.image_size} {spec.color_mode}: defects smaller than a few pixels at that scale may be missed.
"""


def _pointing_text(pointing: dict[str, Any] | None) -> str:
    if not pointing:
        return ""
    rows = "\n".join(f"| {c} | {v['n']} | {v['strict']:.3f} | {v['tolerant']:.3f} | {v['chance']:.3f} |" for c, v in pointing["per_class"].items())
    o = pointing["overall"]
    base = pointing["gradcam_last_layer"]
    truth = "defect masks" if pointing.get("ground_truth") == "masks" else "boxes"
    where = pointing["masks"] if truth == "defect masks" else pointing["annotations"]
    return f"""## Where it looks: heatmap pointing accuracy
On {pointing['images_with_boxes']} of {pointing['of_test_images']} test images with ground-truth {truth} (`{where}`),
{explain.METHOD_NAMES[pointing['method']]} of the predicted class at layer `{pointing['layer']}`: a hit when the heatmap's peak lies on the ground truth (strict), or within
{pointing['tolerance_px']} px of it (the pointing game's tolerance). Chance = the mean share of the image the ground truth covers.
Plain Grad-CAM at the last spatial layer (`{base['layer']}`) scores {base['overall']['strict']:.3f} strict, {base['overall']['tolerant']:.3f} within {pointing['tolerance_px']} px.

| class | n | strict | within {pointing['tolerance_px']} px | chance |
|---|---|---|---|---|
{rows}
| **all** | {o['n']} | **{o['strict']:.3f}** | {o['tolerant']:.3f} | {o['chance']:.3f} |

"""


def _verdict_text(spec: ServingSpec, verdicts: dict[str, Any]) -> str:
    unc = verdicts["uncertain"]
    lines = [f"- `uncertain` when the calibrated confidence is below {spec.uncertain_threshold:.3f}: the {unc['rule']}; "
             f"{unc.get('valid_flagged', 0)} of {unc.get('valid_n', 0)} validation images flagged.",
             f"- `out_of_distribution` when the {verdicts['ood']['rule']} (the OOD score is the largest distance over its threshold: "
             f"above 1 is out of distribution); "
             f"{verdicts['ood']['valid_flagged']} validation images flagged. Also when the image has no usable content "
             f"(blank, or a few pixels){' or is in colour (this model was trained on grayscale images)' if spec.ood and spec.ood.colour_is_ood else ''}."]
    test = verdicts.get("test")
    if test:
        lines.append(f"- Test split: {test['uncertain']} uncertain and {test['out_of_distribution']} out of distribution of {test['n']} "
                     f"({test['flagged_share']:.1%} flagged); {test['errors_flagged']} of the {test['errors_total']} wrong answers were among the flagged.")
    lines.append("- Both thresholds are stored in `serving.json`; `predict --threshold T` (and the app's slider) overrides the uncertainty one per call.")
    return "\n".join(lines)


def _macs(counts: dict[str, Any]) -> str:
    return f", {counts['multiply_adds'] / 1e6:.0f} M multiply-adds per image" if counts.get("multiply_adds") else ""
