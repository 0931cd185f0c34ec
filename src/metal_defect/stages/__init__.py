"""The stage scripts: one module per stage of `python main.py`, numbered as `--stages N` numbers them.

    s1_data_ingestion     c01                       find the labelled images
    s2_data_preprocessing c02                       decode, check, split, EDA
    s3_train              c03 c04 c05 c06_training  train the base models
    s4_evaluation         c06_evaluation            judge them, bundle the best
    s5_tune               c07 (and c06_evaluation)  Keras Tuner search, tuned model judged
    s6_select             (served)                  serve base or tuned, say why

Each holds its stage's entry point (what `pipeline.STAGES` names) and the names of the files
the stage itself writes; the components stay libraries that take typed inputs and folders
and never see the runner. One module per stage on purpose: a stage's code fingerprint is its
import closure, so a shared stages file would make a tuning edit retrain everything.
"""
