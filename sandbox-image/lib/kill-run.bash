# Sourced by sandbox-run and sandbox-kill-run.
# shellcheck shell=bash

# kill_run RUN_ID: kills every process, but this shell, whose environment carries SANDBOX_RUN_ID=RUN_ID.
# Environments are inherited through fork, setsid and double forks, unlike process groups, which is why
# the id lives there. Repeats until a scan finds nothing, so that children forked between a scan and
# its kill are caught by the next round. Only builtins: the common case, nothing left to kill, costs no
# fork at all.
kill_run() {
    local marker="SANDBOX_RUN_ID=$1" environ pid entry round
    local -a victims
    for round in {1..100}; do
        victims=()
        for environ in /proc/[0-9]*/environ; do
            pid=${environ#/proc/}
            pid=${pid%/environ}
            [[ $pid == "$$" ]] && continue
            # A process that exits under us leaves an unreadable file: nothing to kill there.
            while IFS= read -r -d '' entry; do
                if [[ $entry == "$marker" ]]; then
                    victims+=("$pid")
                    break
                fi
            done 2>/dev/null <"$environ"
        done
        ((${#victims[@]})) || return 0
        kill -KILL "${victims[@]}" 2>/dev/null
    done
    echo "kill_run: processes of run $1 still appear after $round rounds" >&2
    return 1
}
