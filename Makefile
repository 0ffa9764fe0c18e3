# The study end to end. `make all` runs it on the embedded synthetic default on the CPU (the
# README says what it costs on a 2-core machine); every knob below is a variable:
# `make all SKIN=/data/ISIC_2019 ARCH=resnet50`.
# Targets are real files, so a rerun (or a rerun after Ctrl-C) only does what is missing.
# `make help` lists the targets; `make -n all` prints the commands without running them.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

# --- data
DATA      ?= data#                  where the synthetic datasets go
SOURCE    ?= $(DATA)/source#         labelled source set (ImageNet stand-in), ImageFolder
SKIN      ?=#                        skin dataset root; empty: the synthetic ISIC 2019 look-alike
SKIN_DIR  := $(patsubst %/,%,$(if $(SKIN),$(SKIN),$(DATA)/skin))
PROTOCOL  ?= random#                  split rule: random | paper | official
PER_CLASS ?= 40#                     paper rule: labelled pool kept per class (the rest is test):
#                                      a number, CLASS=N,... or paper (the paper's 2,554 images)
SPLIT_FLAGS ?=#                       e.g. --drop-downsampled (ISIC 2019, as the paper)
LABELS    ?= 10#                     label budgets, fine-tuning and probe: images per class (10),
#                                      a fraction of each class (0.5) or all; a list makes a curve
PROBE_LABELS ?= 5 $(LABELS) 20 40#    the probe's budgets (seconds per seed): the curve's points
PROBE_VIEWS  ?= 8#                    augmented passes over the probe's train images (its --aug-views)
comma := ,
SPLIT     ?= splits/$(notdir $(SKIN_DIR))-$(PROTOCOL)-$(subst =,,$(subst $(comma),-,$(PER_CLASS)))$(subst /,_,$(subst $(space),,$(subst --,-,$(SPLIT_FLAGS)))).json

# --- model and machine
ARCH       ?= resnet10#                 ResNet-18 with one block per stage: half its compute
SIZE       ?= 32#                    training resolution
CACHE_SIZE ?= 40#                    cached image side (room for crops)
DEVICE     ?= auto
NPROC      ?= 1#                     >1: pretraining under torchrun (DDP), evaluation one seed a rank
CORES      ?= $(shell nproc 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 1)
JOBS       ?= $(if $(filter 1,$(NPROC)),2,1)#  steps `make all` runs at once, CORES/JOBS threads each
WORKERS    ?= 0#                     loader processes per rank (0 is fastest for tiny images)
MAX_STEPS  ?= 0#                     >0: cap every training run (smoke runs)
SYN_FLAGS  ?=#                       extra make_synthetic.py flags (e.g. smaller sets)
OUT        ?= runs
RESULTS    ?= results
CACHE_DIR  ?= cache#                  decoded uint8 images and probe features

# --- initialisations: empty = pretrain here; torchvision / barlowtwins = published weights
SUP_INIT ?=
BT_INIT  ?=

# --- budgets (the embedded default, chosen on the val part: the rule is in the README;
#     `make paper` sets the paper's)
SUP_EPOCHS     ?= 9
BT_EPOCHS      ?= 6
SKINBT_EPOCHS  ?= 3#                  further Barlow Twins from a pretrained init
SKINRND_EPOCHS ?= 6#                  Barlow Twins on skin only, from random init
FT_EPOCHS      ?= 16
SEEDS          ?= 0-5#                6 seeds: the paired test's smallest p is 1/64
RANDOM_SEEDS   ?= $(SEEDS)#            the random init's seeds (the paper ran it 5 times)
CURVE_INITS    ?= $(INITS)#            the inits fine-tuned at LABELS' later budgets too (the
#                                      probe, seconds a seed, runs every init at every budget)
BATCH          ?= 64
BT_BATCH       ?= 64
FT_BATCH       ?= 32
PROJECTOR      ?= 512-512
BT_LR          ?= 0.2
SUP_FLAGS      ?= --lr 0.4 --warmup-epochs 1 --min-scale 0.25#   tiny images: milder crops
BT_FLAGS       ?= --warmup-epochs 1
SKINBT_FLAGS   ?= --preset skin --lr 2e-3 --lr-biases 2e-3 --batch-size $(BT_BATCH) \
                  --projector $(PROJECTOR) --lambd 0.0051
SKINRND_FLAGS  ?= --lr $(BT_LR) $(BT_FLAGS) --batch-size $(BT_BATCH) --projector $(PROJECTOR)
SKINBT_BLOCKS  ?= all#                further BT from a pretrained init: all | layer4 | last
SKIN_POOL      ?= all#                the skin runs' images: all non-test ones | train (the paper's)

# `make all` runs JOBS steps at once (or make's own -jN), each with THREADS = an even share of
# the cores; any other target runs one step at a time on all of them. On a 2-core machine two
# 1-thread ResNet-18 loops ran at 184 + 153 img/s, one 2-thread loop at 304 (batch 64, 32 px),
# and a step's single-threaded parts (imports, loading, fits) overlap the other's work. Steps
# side by side must not share cores: two 2-thread loops ran at 17 + 18 img/s. A thread count
# set in the environment (OMP_NUM_THREADS) is kept
THREADS ?=
share = $(or $(shell (echo $$(( $(CORES) / $(1) > 0 ? $(CORES) / $(1) : 1 ))) 2>/dev/null),1)
ifeq ($(NPROC),1)
RUN := $(if $(and $(THREADS),$(filter undefined,$(origin OMP_NUM_THREADS))),OMP_NUM_THREADS=$(THREADS) )$(PY)
else
RUN := $(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC)
endif
SYS   := --arch $(ARCH) --size $(SIZE) --cache-size $(CACHE_SIZE) --device $(DEVICE) \
         --workers $(WORKERS) --cache-dir $(CACHE_DIR)
TRAIN := $(SYS) --max-steps $(MAX_STEPS)
# a self-supervised run on the source set is watched on the target task: the kNN of the
# skin split's val part (train and val images only), as the skin runs are
WATCH := --monitor-data $(SKIN_DIR) --monitor-split $(SPLIT)
EVAL  := $(SYS) --data $(SKIN_DIR) --split $(SPLIT) \
         --results $(RESULTS)/results.jsonl $(if $(filter 1,$(NPROC)),,--parallel seeds)
# a budget (20, 0.5, all), or budgets of one kind joined by _ (5_10_20): its flag
labels_flag = $(if $(filter all,$(1)),,$(if $(findstring .,$(1)),--label-fraction,--labels-per-class) $(subst _, ,$(1)))
# each step's wall time goes to $(TIMES)/<step>; `make all` prints those of this run at its end
START := $(shell date +%s)
TIMES := $(RESULTS)/.times/$(START)
T0    := t0=$$(date +%s);
took   = && mkdir -p $(TIMES) && echo $$(( $$(date +%s) - t0 )) > "$(TIMES)/$(1)"

SUP     := $(if $(SUP_INIT),$(SUP_INIT),$(OUT)/supervised/backbone.pt)
BT      := $(if $(BT_INIT),$(BT_INIT),$(OUT)/barlow/backbone.pt)
SUP_DEP := $(if $(SUP_INIT),,$(OUT)/supervised/backbone.pt)
BT_DEP  := $(if $(BT_INIT),,$(OUT)/barlow/backbone.pt)
SRC_DEP  = $(if $(and $(SUP_INIT),$(BT_INIT),$(if $(MORE_SSL),,no)),,$(if $(filter $(DATA)/source,$(SOURCE)),$(DATA)/source/.synthetic.json))
SKIN_DEP := $(if $(SKIN),,$(DATA)/skin/.synthetic.json)

# OBJECTIVES="barlow vicreg simclr": each further objective adds its source-pretrained init
# and its +skin variant (further pretraining with its own objective), for comparison
OBJECTIVES ?= barlow
MORE_SSL := $(filter-out barlow,$(OBJECTIVES))
# the inits compared: the four the paper's findings are about; a subset (`make all
# INITS="supervised barlow"`) runs only what they need, ALL_INITS adds the paper's other two
# rows, `random` (no pretraining) and `skinBT` (Barlow Twins on the skin pool alone)
MORE_INITS := $(foreach o,$(MORE_SSL),$(o) $(o)+skin)
INITS ?= supervised barlow supervised+skinBT barlow+skinBT $(MORE_INITS)
ALL_INITS := random supervised barlow supervised+skinBT barlow+skinBT skinBT $(MORE_INITS)
init_path = $(if $(filter random,$(1)),random,$(if $(filter supervised,$(1)),$(SUP),$(if $(filter barlow,$(1)),$(BT),$(OUT)/$(1)/backbone.pt)))
init_dep  = $(if $(filter random,$(1)),,$(if $(filter supervised,$(1)),$(SUP_DEP),$(if $(filter barlow,$(1)),$(BT_DEP),$(OUT)/$(1)/backbone.pt)))
PRETRAINED = $(foreach i,$(INITS),$(call init_dep,$(i)))#  the pretraining runs INITS needs
seeds_of = $(if $(filter random,$(1)),$(RANDOM_SEEDS),$(SEEDS))
tag      = $(notdir $(SKIN_DIR))-$(PROTOCOL)-$(ARCH)-$(SIZE)px-s$(call seeds_of,$(1))
# the probe's budgets go in one process per kind (counts per class, fractions, all): the
# features are extracted once for all of them, and torch's import alone takes seconds
empty :=
space := $(empty) $(empty)
PROBE_ALL    := $(sort $(LABELS) $(PROBE_LABELS))
PROBE_FRACS  := $(foreach l,$(PROBE_ALL),$(if $(findstring .,$(l)),$(l)))
PROBE_COUNTS := $(filter-out all $(PROBE_FRACS),$(PROBE_ALL))
PROBE_GROUPS := $(subst $(space),_,$(strip $(PROBE_COUNTS))) $(subst $(space),_,$(strip $(PROBE_FRACS))) \
                $(filter all,$(PROBE_ALL))
ft_labels = $(if $(filter $(1),$(CURVE_INITS)),$(LABELS),$(firstword $(LABELS)))
DONE  := $(foreach i,$(INITS),$(foreach l,$(call ft_labels,$(i)),$(RESULTS)/.done/finetune-$(i)-$(l)-$(call tag,$(i))) \
           $(foreach g,$(PROBE_GROUPS),$(RESULTS)/.done/probe-$(i)-$(g)-$(call tag,$(i))))

.PHONY: all help install settings test test-fast test-compile data split pretrain eval report paper bench bench-gpu \
        ablation budgets clean distclean
.DEFAULT_GOAL := help

help:  ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 12

# --------------------------------------------------------------------------- setup
install: $(VENV)/.installed  ## create .venv and install requirements.txt (again when it changes)
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# the test files run in parallel, one worker per core, each file whole in one worker (its
# module fixtures are built once); most tests wait on subprocesses that use one thread
PYTEST := $(PY) -m pytest -q -n auto --dist loadfile

test: install  ## the whole test suite (CPU, offline, minutes) but torch.compile's
	$(PYTEST) -m "not compile"

test-fast: install  ## the tests without the slow end-to-end ones
	$(PYTEST) -m "not slow and not compile"

test-compile: install  ## --compile through the scripts on the CPU (minutes: inductor builds C++)
	$(PY) -m pytest -q -m compile

# --------------------------------------------------------------------------- the experiment
# the steps run JOBS at a time, or as many as make's own -jN says (-j alone: one thread each)
jobs_given = $(if $(filter -j%,$(MAKEFLAGS)),$(or $(patsubst -j%,%,$(filter -j%,$(MAKEFLAGS))),$(CORES)))
all: install  ## the whole study on the embedded default, ending with the table
	@$(if $(shell [ "$(JOBS)" -ge 1 ] 2>/dev/null && echo ok),,$(error JOBS=$(JOBS): give the number of steps to run at once, 1 or more))$(check_settings)
	@$(keep_settings)
	@+$(MAKE) --no-print-directory $(if $(jobs_given),,-j$(JOBS)) \
	  THREADS=$(or $(THREADS),$(call share,$(or $(jobs_given),$(JOBS)))) report

# what changes the runs' results; OUT keeps the settings it was made with (.settings), and
# `make all` with others is refused: the finished runs would be reused, and the seeds' rows
# skipped as done, or a run resumed with other settings stopped (SEEDS, LABELS and INITS
# may grow: they add runs)
SETTING_VARS := SKIN_DIR SOURCE SYN_FLAGS PROTOCOL PER_CLASS SPLIT_FLAGS ARCH SIZE CACHE_SIZE \
  MAX_STEPS SUP_INIT BT_INIT SUP_EPOCHS BT_EPOCHS SKINBT_EPOCHS SKINRND_EPOCHS FT_EPOCHS BATCH \
  BT_BATCH FT_BATCH PROJECTOR BT_LR SUP_FLAGS BT_FLAGS SKINBT_FLAGS SKINRND_FLAGS SKINBT_BLOCKS \
  SKIN_POOL PROBE_VIEWS
SETTINGS := $(foreach v,$(SETTING_VARS),$(v)=$(subst $(space),_,$(strip $($(v)))))
settings_changed = $(if $(wildcard $(OUT)/.settings),$(filter-out $(shell cat $(OUT)/.settings),$(SETTINGS)))
check_settings = $(if $(settings_changed),$(error $(OUT) holds runs made with other settings (now $(settings_changed)); make clean first, or give these their own OUT=... RESULTS=...))
keep_settings = mkdir -p $(OUT) && printf '%s\n' $(foreach s,$(SETTINGS),'$(s)') > $(OUT)/.settings
settings:  # the same check for the targets that build on make all's runs (ablation, budgets)
	@$(check_settings)$(keep_settings)

data: $(SRC_DEP) $(SKIN_DEP)  ## the synthetic datasets (only when no dataset is given)
$(DATA)/source/.synthetic.json $(DATA)/skin/.synthetic.json: | make_synthetic.py
	@echo "==> synthetic $(@D)"
	$(T0) $(PY) make_synthetic.py --out $(DATA) --only $(notdir $(@D)) $(SYN_FLAGS) \
	  $(call took,data-$(notdir $(@D)))

split: $(SPLIT)  ## the split of the skin set, made once and reused by every step
$(SPLIT): $(SKIN_DEP) | common.py
	@echo "==> split $(SKIN_DIR) ($(PROTOCOL))"
	$(T0) $(PY) common.py split --data $(SKIN_DIR) --protocol $(PROTOCOL) --per-class $(PER_CLASS) \
	  $(SPLIT_FLAGS) --out $@ $(call took,split)

pretrain: $(PRETRAINED)  ## every pretrained init that INITS needs

$(OUT)/supervised/backbone.pt: $(SRC_DEP) | pretrain_supervised.py
	@echo "==> supervised pretraining on $(SOURCE)"
	$(T0) $(RUN) pretrain_supervised.py $(TRAIN) --data $(SOURCE) --epochs $(SUP_EPOCHS) \
	  --batch-size $(BATCH) $(SUP_FLAGS) --out $(@D) $(call took,pretrain-supervised)

$(OUT)/barlow/backbone.pt: $(SRC_DEP) $(SPLIT) | pretrain_barlow.py
	@echo "==> Barlow Twins pretraining on $(SOURCE)"
	$(T0) $(RUN) pretrain_barlow.py $(TRAIN) --data $(SOURCE) --epochs $(BT_EPOCHS) \
	  --batch-size $(BT_BATCH) --lr $(BT_LR) $(BT_FLAGS) --projector $(PROJECTOR) $(WATCH) \
	  --out $(@D) $(call took,pretrain-barlow)

$(OUT)/supervised+skinBT/backbone.pt: $(SUP_DEP) $(SPLIT) | pretrain_barlow.py
	@echo "==> further Barlow Twins on the skin pool, from supervised"
	$(T0) $(RUN) pretrain_barlow.py $(TRAIN) $(SKINBT_FLAGS) --data $(SKIN_DIR) --split $(SPLIT) \
	  --pool $(SKIN_POOL) --init $(SUP) --train-blocks $(SKINBT_BLOCKS) --epochs $(SKINBT_EPOCHS) \
	  --out $(@D) $(call took,pretrain-supervised+skinBT)

$(OUT)/barlow+skinBT/backbone.pt: $(BT_DEP) $(SPLIT) | pretrain_barlow.py
	@echo "==> further Barlow Twins on the skin pool, from Barlow Twins"
	$(T0) $(RUN) pretrain_barlow.py $(TRAIN) $(SKINBT_FLAGS) --data $(SKIN_DIR) --split $(SPLIT) \
	  --pool $(SKIN_POOL) --init $(BT) --train-blocks $(SKINBT_BLOCKS) --epochs $(SKINBT_EPOCHS) \
	  --out $(@D) $(call took,pretrain-barlow+skinBT)

$(OUT)/skinBT/backbone.pt: $(SPLIT) | pretrain_barlow.py
	@echo "==> Barlow Twins on the skin pool only, from random init"
	$(T0) $(RUN) pretrain_barlow.py $(TRAIN) $(SKINRND_FLAGS) --data $(SKIN_DIR) --split $(SPLIT) \
	  --pool $(SKIN_POOL) --init random --epochs $(SKINRND_EPOCHS) --out $(@D) \
	  $(call took,pretrain-skinBT)

define SSL_RULES
$(OUT)/$(1)/backbone.pt: $(SRC_DEP) $(SPLIT) | pretrain_barlow.py
	@echo "==> $(1) pretraining on $(SOURCE)"
	$$(T0) $(RUN) pretrain_barlow.py $(TRAIN) --objective $(1) --data $(SOURCE) \
	  --epochs $(BT_EPOCHS) --batch-size $(BT_BATCH) --lr $(BT_LR) $(BT_FLAGS) \
	  --projector $(PROJECTOR) $(WATCH) --out $$(@D) $$(call took,pretrain-$(1))
$(OUT)/$(1)+skin/backbone.pt: $(OUT)/$(1)/backbone.pt $(SPLIT) | pretrain_barlow.py
	@echo "==> further $(1) on the skin pool, from $(1)"
	$$(T0) $(RUN) pretrain_barlow.py $(TRAIN) $(SKINBT_FLAGS) --objective $(1) \
	  --data $(SKIN_DIR) --split $(SPLIT) --pool $(SKIN_POOL) --init $(OUT)/$(1)/backbone.pt \
	  --train-blocks $(SKINBT_BLOCKS) --epochs $(SKINBT_EPOCHS) --out $$(@D) \
	  $$(call took,pretrain-$(1)+skin)
endef
$(foreach o,$(MORE_SSL),$(eval $(call SSL_RULES,$(o))))

# the evaluations wait for the pretraining runs on the source: under -j a further round,
# the longest chain, then starts as soon as its init is done, where make would otherwise hand
# the free job slot to an evaluation already queued (measured: the barlow+skinBT round ran
# 122 s after its init was done, the last 50 s of `make all` on one slot)
SOURCE_RUNS = $(filter $(SUP_DEP) $(BT_DEP) $(foreach o,$(MORE_SSL),$(OUT)/$(o)/backbone.pt),$(PRETRAINED))
define FINETUNE_RULE
$(RESULTS)/.done/finetune-$(1)-$(2)-$(call tag,$(1)): $(call init_dep,$(1)) $(SPLIT) | finetune.py $(SOURCE_RUNS)
	@echo "==> fine-tune $(1), $(2) labels, seeds $(call seeds_of,$(1))"
	$$(T0) $(RUN) finetune.py $(EVAL) --seeds $(call seeds_of,$(1)) $(call labels_flag,$(2)) \
	  --max-steps $(MAX_STEPS) --init $(call init_path,$(1)) --init-name $(1) \
	  --epochs $(FT_EPOCHS) --batch-size $(FT_BATCH) --out $(OUT)/finetune \
	  $$(call took,finetune-$(1)-$(2))
	@mkdir -p $$(@D) && touch $$@
endef
define PROBE_RULE
$(RESULTS)/.done/probe-$(1)-$(2)-$(call tag,$(1)): $(call init_dep,$(1)) $(SPLIT) | probe.py $(SOURCE_RUNS)
	@echo "==> linear probe $(1), $(subst _, ,$(2)) labels, seeds $(call seeds_of,$(1))"
	$$(T0) $(RUN) probe.py $(EVAL) --seeds $(call seeds_of,$(1)) $(call labels_flag,$(2)) \
	  --aug-views $(PROBE_VIEWS) --init $(call init_path,$(1)) --init-name $(1) \
	  $$(call took,probe-$(1)-$(2))
	@mkdir -p $$(@D) && touch $$@
endef
$(foreach i,$(INITS),$(foreach l,$(LABELS),$(eval $(call FINETUNE_RULE,$(i),$(l)))))
$(foreach i,$(INITS),$(foreach g,$(PROBE_GROUPS),$(eval $(call PROBE_RULE,$(i),$(g)))))

eval: $(DONE)  ## fine-tune and probe every init over the seeds

# --------------------------------------------------------------------------- choosing budgets
# fine-tuning epochs scored on the val part, with seeds the results never use: the rule in the
# README reads these (and the pretraining runs' kNN monitor on the val part), never the test
FT_EPOCHS_GRID ?= 4 8 16
budgets: install settings $(SUP_DEP) $(BT_DEP) $(SPLIT) | finetune.py  ## FT_EPOCHS_GRID on the val part: results/budgets/
	@for e in $(FT_EPOCHS_GRID); do for i in supervised barlow; do \
	  echo "==> fine-tune $$i for $$e epochs, scored on the val part"; \
	  init=$$( [ $$i = supervised ] && echo $(SUP) || echo $(BT) ); \
	  $(RUN) finetune.py $(EVAL) $(call labels_flag,$(firstword $(LABELS))) --eval-part val \
	    --max-steps $(MAX_STEPS) \
	    --seeds 100-102 --results $(RESULTS)/budgets/results.jsonl --init $$init \
	    --init-name $$i-$${e}ep --epochs $$e --batch-size $(FT_BATCH) --out $(OUT)/finetune \
	    || exit 1; done; done
	$(PY) report.py --results $(RESULTS)/budgets/results.jsonl --out $(RESULTS)/budgets \
	  --runs $(OUT) --baseline supervised-$(firstword $(FT_EPOCHS_GRID))ep

# --------------------------------------------------------------------------- how much unlabelled data
# further Barlow Twins from the Barlow Twins init on a share of the skin pool (whole lesions),
# each share fine-tuned and probed: the metric against the number of unlabelled images. Each
# share gets the whole pool's number of steps (SKINBT_EPOCHS / F epochs, rounded), so the
# shares differ in unlabelled images, not in compute
POOL_FRACTIONS ?= 0.1 0.3 1.0
share_epochs = $(shell awk 'BEGIN { e = int($(SKINBT_EPOCHS) / $(1) + 0.5); print (e < 1 ? 1 : e) }')
define ABLATION_RULES
$(OUT)/barlow+skinBT@$(1)/backbone.pt: $(BT_DEP) $(SPLIT) | pretrain_barlow.py
	@echo "==> further Barlow Twins on $(1) of the skin pool, from Barlow Twins"
	$$(T0) $(RUN) pretrain_barlow.py $(TRAIN) $(SKINBT_FLAGS) --data $(SKIN_DIR) --split $(SPLIT) \
	  --pool $(SKIN_POOL) --init $(BT) --train-blocks $(SKINBT_BLOCKS) \
	  --epochs $(call share_epochs,$(1)) --pool-fraction $(1) --out $$(@D) \
	  $$(call took,pretrain-barlow+skinBT@$(1))
endef
# one eval a rule: rules joined into one text by foreach would run together
$(foreach f,$(POOL_FRACTIONS),$(eval $(call ABLATION_RULES,$(f)))$(foreach l,$(LABELS),\
  $(eval $(call FINETUNE_RULE,barlow+skinBT@$(f),$(l)))$(eval $(call PROBE_RULE,barlow+skinBT@$(f),$(l)))))
ABLATION := $(foreach f,$(POOL_FRACTIONS),$(foreach l,$(LABELS),\
              $(RESULTS)/.done/finetune-barlow+skinBT@$(f)-$(l)-$(call tag,barlow+skinBT@$(f)) \
              $(RESULTS)/.done/probe-barlow+skinBT@$(f)-$(l)-$(call tag,barlow+skinBT@$(f))))

ablation: install settings $(ABLATION) | report.py  ## further pretraining on shares of the pool (POOL_FRACTIONS)
	@echo "==> report"
	$(PY) report.py --results $(RESULTS)/results.jsonl --out $(RESULTS) --runs $(OUT)

# the pretrained inits first: under -j a further round starts as soon as its init is done,
# before the evaluations that could wait
report: $(PRETRAINED) $(DONE) | report.py  ## the comparison table: results/summary.md (+ .csv, .png)
	@echo "==> report"
	$(PY) report.py --results $(RESULTS)/results.jsonl --out $(RESULTS) --runs $(OUT)
	@if [ -d $(TIMES) ]; then echo "==> wall time of each step (s):"; cd $(TIMES) && \
	  for f in $$(ls -tr); do printf '  %-32s %5s\n' "$$f" "$$(cat $$f)"; done; fi
	@echo "==> total: $$(( $$(date +%s) - $(START) )) s"

# --------------------------------------------------------------------------- the paper's setting
# the paper's grid: all 2,554 labelled images (PER_CLASS=paper: the paper's counts per class)
# for every init (random init 5 seeds, the others 35), and half of each class for supervised
# and barlow (PAPER_LABELS=all leaves it out; PAPER_CURVE_INITS="random supervised ..."
# fine-tunes more inits at it, PAPER_RANDOM_SEEDS=0-34 runs random init as often as the rest:
# the README's cost table says what each adds)
PAPER_LABELS       ?= all 0.5
PAPER_CURVE_INITS  ?= supervised barlow
PAPER_RANDOM_SEEDS ?= 0-4
paper:  ## the paper's experiment: ResNet-50, 256 px, published weights, 35 seeds (GPU; SKIN=...)
	@test -n "$(SKIN)" || { echo "make paper needs SKIN=/path/to/ISIC_2019 (see README)"; exit 2; }
	$(MAKE) all INITS="$(ALL_INITS)" JOBS=1 ARCH=resnet50 SIZE=256 CACHE_SIZE=256 PROTOCOL=paper PER_CLASS=paper \
	  LABELS="$(PAPER_LABELS)" PROBE_LABELS= PROBE_VIEWS=16 SEEDS=0-34 RANDOM_SEEDS=$(PAPER_RANDOM_SEEDS) \
	  CURVE_INITS="$(PAPER_CURVE_INITS)" FT_EPOCHS=40 FT_BATCH=64 SUP_INIT=torchvision BT_INIT=barlowtwins \
	  SKINBT_EPOCHS=100 SKINRND_EPOCHS=1000 BT_BATCH=128 PROJECTOR=8192-8192-8192 \
	  SKINBT_FLAGS="--preset skin --lambd 0.000122 --batch-size 128 --lr auto" SKINBT_BLOCKS=last \
	  SKINRND_FLAGS="--preset skin --lambd 0.000122 --batch-size 128 --lr auto" SKIN_POOL=train \
	  SPLIT_FLAGS=--drop-downsampled WORKERS=8 OUT=runs/paper \
	  RESULTS=results/paper

# --------------------------------------------------------------------------- benchmarks, cleaning
bench: install  ## throughput table (augmentation, training steps, cache vs JPEG, probe)
	$(PY) tests/bench.py

# BENCH_PY=python3: a GPU machine's own torch, where .venv cannot be installed (no network)
BENCH_PY ?= $(PY)
bench-gpu: $(if $(filter $(PY),$(BENCH_PY)),install)  ## the GPU table on one H200-class GPU (at most 7 minutes): results/bench-gpu.md
	$(BENCH_PY) tests/bench_gpu.py --device cuda --out $(RESULTS)/bench-gpu.md

clean:  ## remove runs, results, splits and caches (keeps data/ and .venv)
	rm -rf $(OUT) $(RESULTS) splits $(CACHE_DIR)

distclean: clean  ## also the synthetic data and .venv
	rm -rf $(DATA) $(VENV)
