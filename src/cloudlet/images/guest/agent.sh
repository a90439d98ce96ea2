#!/bin/sh
# /usr/lib/cloudlet/agent.sh: the cloudlet guest agent on the virtio-serial port named
# org.cloudlet.agent. One request line in, one reply line out (see docs/images.md):
#   PING <id>                        -> PONG <id>
#   EXEC <id> <b64 cmd> <b64 stdin>  -> RESULT <id> <exit code> <b64 stdout> <b64 stderr>
# Fields are base64 without wrapping, "-" when empty. One command at a time. Never exits.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
NAME=org.cloudlet.agent
WORK=/run/cloudlet/agent
mkdir -p "$WORK"

# nap SECONDS: sleep without forking (a fork costs a lot under TCG, and we poll 5 times a second
# while the host is not connected): a read with a timeout on a FIFO nobody writes to.
rm -f "$WORK/nap"
mkfifo "$WORK/nap" && command exec 5<>"$WORK/nap"
nap() { read -t "$1" _ <&5 || :; }

find_port() {
    for f in /sys/class/virtio-ports/*/name; do
        [ -r "$f" ] || continue
        if [ "$(cat "$f")" = "$NAME" ]; then
            d=${f%/name}
            echo "/dev/${d##*/}"
            return 0
        fi
    done
    return 1
}

b64() { # file -> base64 field
    if [ -s "$1" ]; then base64 -w0 "$1"; else printf -; fi
}

unb64() { # field -> stdout ("-" is empty); fails on truncated input
    [ "$1" = - ] || printf %s "$1" | base64 -d
}

fail() { # id message: a decoding error, reported like a command that could not run
    echo "RESULT $1 127 - $(printf '%s\n' "$2" | base64 -w0)"
}

run_exec() { # id cmd stdin
    unb64 "$2" >"$WORK/cmd" || { fail "$1" "agent: bad base64 command"; return; }
    unb64 "$3" >"$WORK/in" || { fail "$1" "agent: bad base64 stdin"; return; }
    (cd / && sh -c "$(cat "$WORK/cmd")" <"$WORK/in" >"$WORK/out" 2>"$WORK/err" 3>&- 5>&-)
    rc=$?
    echo "RESULT $1 $rc $(b64 "$WORK/out") $(b64 "$WORK/err")"
    rm -f "$WORK/cmd" "$WORK/in" "$WORK/out" "$WORK/err"
}

port=
while :; do
    [ -c "$port" ] || port=$(find_port) || { nap 1; continue; }
    command exec 3<>"$port" || { port=; nap 1; continue; }
    # read returns false on EOF: the host side is not connected. Reopen after a pause.
    while IFS=' ' read -r verb id a b rest <&3; do
        case "$id" in
            '' | *[!A-Za-z0-9]*) continue ;;
        esac
        case "$verb" in
            PING) echo "PONG $id" >&3 ;;
            EXEC) run_exec "$id" "${a:--}" "${b:--}" >&3 ;;
        esac
    done
    exec 3<&-
    nap 0.2
done
