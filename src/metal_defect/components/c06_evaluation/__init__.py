"""c06 evaluation: judge every trained model on validation, choose one, report on test.

The choice uses validation only (macro F1, ties by lower validation log loss); the test
split is touched once, for the chosen model. Every figure states n, the error count and a
95 % Wilson interval. A temperature fitted on validation is stored with the model when it
lowers the validation negative log-likelihood. The chosen model, its input contract,
temperature and model card are written as a self-contained bundle (`served/`); the select
stage decides whether it or a tuned model is served.

The rooms: `evaluate` (the whole evaluation of a trained-models folder, and its file names),
`scores` (metrics and plots of one set, calibration, the choice), `verdicts` (uncertain and
out-of-distribution thresholds), `heatmaps` (heatmap layer, pointing accuracy), `gate` (the
quality gate against simpler baselines), `model_card`.
"""
