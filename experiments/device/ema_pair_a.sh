#!/usr/bin/env bash
# Issue 18, same lease: does an exponential moving average of the weights (--ema 0.999, handed on instead of the
# last step's weights) help `small`? wd_pair_a.sh's four runs (seeds 0 and 1 of each arm, a quarter of one GPU each
# for MINUTES) with and without the average. ensemble_b.sh waits and packs (issue it at once, same warm machine).
CONFIGS="mambahome-small-allcases mambahome-small-allcases-ema" exec bash experiments/device/wd_pair_a.sh
