#!/usr/bin/env bash
# Mutation score of the numeric and privacy core against the fast tests (mutmut 3; not part of CI).
#
#   bash scripts/mutation.sh                 # every group below, tests of this checkout
#   bash scripts/mutation.sh suv lesions     # some groups
#   TESTS_FROM=<git rev> bash scripts/mutation.sh suv   # the tests as they were at <rev> (a "before" score)
#   JOBS=2 bash scripts/mutation.sh          # mutmut's parallel children (default: 2)
#
# Each group mutates one module, runs only the mutants of the functions named for it (the core:
# SUV, lesion statistics, registration acceptance, resampling bounds, de-identification and the
# leak check, splits, loader geometry), against the fast tests that cover it (no session-scoped
# cohorts: each mutant runs in a fresh fork, so a fixture that generates DICOM would dominate; no
# test that starts `python -m builder` in another folder: mutated code there cannot find its config).
# The work happens in a scratch copy of the tracked files ($MUTATION_DIR, default a temp folder),
# so the checkout is never touched. It prints the score per group and the survivors by function,
# each classed code / message text / log line (scripts/mutation_report.py); `mutmut show <name>` in
# the group's folder shows a survivor's diff. Lesion statistics leave out the body region (an
# anatomical approximation good to centimetres, checked against the generator in test_end_to_end);
# resampling leaves out test_align's coarse-PET registrations (9 s each, run before the fast tests
# for every mutant of the upsampling). Each part prints its wall and CPU time (user + system of
# mutmut and every fork it waited for) with the load; the end prints the totals and writes every
# survivor with its reason to $MUTATION_DIR/survivors.md (scripts/mutation_survivors.py, which
# names any survivor it cannot explain: docs/mutation-survivors.md is that file, committed).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
JOBS=${JOBS:-2}
SCRATCH=${MUTATION_DIR:-$(mktemp -d -t lymphatlas-mutation.XXXXXX)}
mkdir -p "$SCRATCH"
"$PY" -c "import mutmut" 2>/dev/null || { echo "mutmut is not installed: pip install -e '.[dev]'" >&2; exit 2; }

# group | module to mutate | mutant name globs (module.x_function*) | pytest selection | selection for
# TESTS_FROM revisions without tests/test_behaviour_guards.py (empty: the same without that file)
GROUPS_TABLE=$(cat <<'EOF'
suv|builder/convert/suv.py|builder.convert.suv.x*|tests/test_suv.py tests/test_behaviour_guards.py -k "not cohort and (not test_behaviour_guards or philips or ge_)"|tests/test_suv.py -k "not cohort"
lesions|builder/convert/lesions.py|builder.convert.lesions.x_peak_kernel* builder.convert.lesions.x__to_pet_index* builder.convert.lesions.x__native_peaks* builder.convert.lesions.x_lesion_statistics* builder.convert.lesions.x__label_box* builder.convert.lesions.x__lesion_item* builder.convert.lesions.x__whole_body*|tests/test_lesions.py tests/test_behaviour_guards.py -k "not test_behaviour_guards or dmax or suvpeak"|tests/test_lesions.py
acceptance|builder/convert/align.py|builder.convert.align.x__register__* builder.convert.align.x_align_pet*|tests/test_behaviour_guards.py -k "candidate or bspline_refinement or registration_disabled or auto_refines"|tests/test_align.py -k "worsens"
resampling|builder/convert/align.py|builder.convert.align.x__row_intervals* builder.convert.align.x__zero_beyond_fov* builder.convert.align.x__upsample_axis* builder.convert.align.x__upsample_array* builder.convert.align.x_upsample_cubic2* builder.convert.align.x_resample_to_reference* builder.convert.align.x__coarse_axes* builder.convert.align.x__crop_to_reference*|tests/test_align.py -k "(bounded or upsample or unbounded or suvmax) and not registers"|
deid|builder/convert/deid.py|builder.convert.deid.x*|tests/test_deid.py -k "not owner_only"|
splits|builder/release/splits.py|builder.release.splits.x*|tests/test_splits.py|
loader|lymphatlas_ds/loader.py|lymphatlas_ds.loader.x__spacing_zyx* lymphatlas_ds.loader.xǁPatchDatasetǁ* lymphatlas_ds.loader.xǁCaseDatasetǁ*|tests/test_loader.py tests/test_lesion_table.py -k "(test_loader and not dataloader and not worker) or load_lymphatlas_instances or case_instance_ids"|tests/test_loader.py -k "not dataloader and not worker"
EOF
)

wanted=("$@")
summary=()
total_wall=0
total_cpu=0
while IFS='|' read -r group module globs selection before; do
  if [ ${#wanted[@]} -gt 0 ] && [[ ! " ${wanted[*]} " == *" $group "* ]]; then continue; fi
  dir=$SCRATCH/$group
  rm -rf "$dir" && mkdir -p "$dir"
  git -C "$ROOT" ls-files -z | (cd "$ROOT" && xargs -0 cp --parents -t "$dir")
  if [ -n "${TESTS_FROM:-}" ]; then
    rm -rf "$dir/tests" && git -C "$ROOT" archive "$TESTS_FROM" tests | tar -x -C "$dir"
    if [ ! -e "$dir/tests/test_behaviour_guards.py" ]; then selection=${before:-${selection//tests\/test_behaviour_guards.py/}}; fi
  fi
  # pytest arguments as a TOML list: the files, then -k and its expression
  files=${selection%% -k *}
  args=$(printf '"%s", ' $files)
  if [[ "$selection" == *" -k "* ]]; then args+="\"-k\", \"$(printf '%s' "${selection#* -k }" | tr -d '"')\", "; fi
  cat >>"$dir/pyproject.toml" <<EOF

[tool.mutmut]
source_paths = ["builder", "lymphatlas_ds", "lymphatlas_synth"]
only_mutate = ["$module"]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-p", "no:randomly", "-n", "0", "-q"]
pytest_add_cli_args_test_selection = [${args%, }]
use_git_change_detection = false
# the release builder ships the client wheel built from the running tree, whose readme is README.md
also_copy = ["README.md"]
EOF
  echo "== $group: $module against $selection" >&2
  start=$(date +%s)
  # shellcheck disable=SC2086
  # A module fixture's fake release is built by the first test run and reused read-only by every
  # mutant's fork (tests/support/releases.py, shared_fake_release): ~7 s less per loader mutant.
  (cd "$dir" && LYMPHATLAS_TEST_SHARED_RELEASES="$dir/shared-releases" \
    /usr/bin/time -f "%e %U %S" -o "$dir/time.txt" \
    "$PY" -m mutmut run --max-children "$JOBS" $globs >"$dir/run.log" 2>&1) || true
  (cd "$dir" && "$PY" -m mutmut results --all true >"$dir/results.txt" 2>&1) || true
  # shellcheck disable=SC2086
  line=$("$PY" "$ROOT/scripts/mutation_report.py" "$dir" "$module" "$(( $(date +%s) - start ))" $globs 2>"$dir/survivors.txt")
  cat "$dir/survivors.txt"
  # wall and CPU seconds (user + system of mutmut and every fork it waited for) and the load after
  read -r wall user sys < <(tail -n 1 "$dir/time.txt") || true
  line+=$(printf '; wall %.0f s, CPU %.0f s (user %.0f + sys %.0f), load %s' "$wall" "$(echo "$user + $sys" | bc)" "$user" "$sys" "$(cut -d' ' -f1-3 /proc/loadavg)")
  echo "$line"
  summary+=("$line")
  total_wall=$(echo "$total_wall + $wall" | bc)
  total_cpu=$(echo "$total_cpu + $user + $sys" | bc)
done <<<"$GROUPS_TABLE"

echo "== mutation score (folders in $SCRATCH)"
printf '%s\n' "${summary[@]}"
# On 2 idle cores the run takes at least CPU / 2 (both mutmut children busy) and at most CPU (serial).
printf 'total: wall %.0f s, CPU %.0f s (on 2 idle cores: %.0f to %.0f s), load %s\n' "$total_wall" "$total_cpu" \
  "$(echo "$total_cpu / 2" | bc)" "$total_cpu" "$(cut -d' ' -f1-3 /proc/loadavg)"
"$PY" "$ROOT/scripts/mutation_survivors.py" "$SCRATCH" >"$SCRATCH/survivors.md" \
  && echo "every survivor explained: $SCRATCH/survivors.md" || echo "see UNEXPLAINED in $SCRATCH/survivors.md"
