# Sourced by sandbox-hangup (the terminal's hang-up; runs and processes end through the agent now).
# shellcheck shell=bash

# Processes of a run (an exec or a terminal) carry SANDBOX_RUN_ID=<id> in their environment, which is
# inherited through fork, setsid and double forks, unlike process groups. These functions use only
# builtins: the common case, nothing left to signal, costs no fork at all.

# run_pids RUN_ID: sets the array `pids` to every process, but this shell, of the run.
run_pids() {
    local marker="SANDBOX_RUN_ID=$1" environ pid entry
    pids=()
    for environ in /proc/[0-9]*/environ; do
        pid=${environ#/proc/}
        pid=${pid%/environ}
        [[ $pid == "$$" ]] && continue
        # A process that exits under us leaves an unreadable file: nothing to signal there.
        while IFS= read -r -d '' entry; do
            if [[ $entry == "$marker" ]]; then
                pids+=("$pid")
                break
            fi
        done 2>/dev/null <"$environ"
    done
}

# kill_run RUN_ID: SIGKILLs the run's processes, repeating until a scan finds none, so that children
# forked between a scan and its kill are caught by the next round.
kill_run() {
    local round
    local -a pids
    for round in {1..100}; do
        run_pids "$1"
        ((${#pids[@]})) || return 0
        kill -KILL "${pids[@]}" 2>/dev/null
    done
    echo "kill_run: processes of run $1 still appear after $round rounds" >&2
    return 1
}

# hangup_run RUN_ID: SIGHUPs the run's processes, as a terminal that goes away does: the shell and its
# jobs end, and what was started with nohup stays.
hangup_run() {
    local -a pids
    run_pids "$1"
    ((${#pids[@]})) || return 0
    kill -HUP "${pids[@]}" 2>/dev/null
    return 0
}
