"""c07 hyperparameter search with Keras Tuner.

A Keras Tuner search (random, bayesian or hyperband) around the best base model
of evaluation (or one named in `tuning.model`), over the space in `tuning.space`. Every trial
trains with the train stage's own pieces (c03 loader, c04 builder, c05 callbacks, the same
loss, optimizer and class weights) for `tuning.epochs_per_trial` epochs, only to rank
configurations; with the random and Bayesian tuners the first trial is the recipe itself. The
tuned model is the best configuration trained again from scratch with the train stage's full
schedule (`finalist`), written like a train-stage output and evaluated by c06's
evaluate_models, through the predictor, exactly like the base models; when the recipe's own
trial ranks first there is nothing to retrain and the base model competes alone.

The Keras Tuner project lives in `paths.tuning` (default `<artifacts>/tuning`), in a folder
keyed by the model, the search settings, the training recipe and the prepared data: a
changed space starts a new search, an unchanged one resumes (finished trials are kept). A
trial that raises is recorded as failed (FailedTrialError) and the search goes on; a data or
artifact error is fatal. The wall-clock budget (`tuning.max_minutes`) covers the search and
the finalist; the search's share is enforced by the oracle, so it also holds for a distributed
search: no trial starts after it (earlier when the best trial so far needs longer than the base
model for the full schedule), and a running trial stops at its next epoch end.

Distributed: Keras Tuner's chief/worker mode. The chief is the process running this stage
with KERASTUNER_TUNER_ID=chief, KERASTUNER_ORACLE_IP and KERASTUNER_ORACLE_PORT set (or
`python main.py run --tune-chief HOST:PORT`); it writes `active.json` into `paths.tuning`
and serves the oracle. Workers (`python main.py tune-worker`) read it, prepare the data
from their own config (reused when the artifacts folder is shared), refuse to take trials
when their data or recipe fingerprint differs from the chief's, and train trials, writing
checkpoints into the shared project folder.

The rooms: `space` (what is searched, where values go, the recipe as a point), `trials` (oracle,
tuner, the child process of a trial), `finalist` (the budget's split, the finalist's training),
`distributed` (chief and workers), `report` (trials table and plot). The tune
stage (`metal_defect.stages.s5_tune`) runs a search and writes its outputs; the select stage
(`s6_select`) chooses between the base and the tuned model.
"""
