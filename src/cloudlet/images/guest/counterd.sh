#!/bin/sh
# Service: the counter daemon behind /www/cgi-bin/counter.
# It keeps n in this shell's memory (so it survives a memory snapshot but not a reboot) and m in
# /var/lib/cloudlet/counter (so it survives both). Requests come as one line each on a FIFO that
# this daemon holds open read-write (it never sees EOF): the line is the numeric id of a reply
# FIFO /run/cloudlet/counter/<id> made by the CGI. Lines are far below PIPE_BUF, so concurrent
# writers never interleave, and requests are served one at a time: no lock is needed.
DIR=/run/cloudlet/counter
REQ=/run/cloudlet/counterd.fifo
DISK=/var/lib/cloudlet/counter
mkdir -p "$DIR" "${DISK%/*}"
[ -p "$REQ" ] || { rm -f "$REQ.new"; mkfifo -m 0600 "$REQ.new" && mv "$REQ.new" "$REQ"; }
exec 3<>"$REQ"

n=0
while read -r id <&3; do
    case "$id" in '' | *[!0-9]*) continue ;; esac
    n=$((n + 1))
    m=$(cat "$DISK" 2>/dev/null)
    case "$m" in '' | *[!0-9]*) m=0 ;; esac
    m=$((m + 1))
    echo "$m" >"$DISK.tmp" && sync "$DISK.tmp" && mv "$DISK.tmp" "$DISK" && sync "${DISK%/*}"
    # Opening read-write never blocks, even if the CGI has gone away.
    [ -p "$DIR/$id" ] && echo "memory=$n disk=$m" 1<>"$DIR/$id"
done
