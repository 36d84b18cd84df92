#!/usr/bin/env bash
# Issue 18, same lease: does stochastic depth of the encoder's Mamba and HoME branches (ModelConfig.drop_path 0.2)
# help `small`, which over-fits the training cases early? wd_pair_a.sh's four runs (seeds 0 and 1 of each arm, a
# quarter of one GPU each for MINUTES, default 14 as the weight-decay pair, whose baseline arm this repeats) with and
# without it. ensemble_b.sh waits and packs (issue it at once, same warm machine).
CONFIGS="mambahome-small-allcases mambahome-small-allcases-dp" exec bash experiments/device/wd_pair_a.sh
