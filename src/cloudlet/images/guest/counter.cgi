#!/bin/sh
# CGI /cgi-bin/counter: ask counterd for the next count; body "memory=<n> disk=<m>".
DIR=/run/cloudlet/counter
REQ=/run/cloudlet/counterd.fifo
reply="$DIR/$$"

fail() {
    printf 'Status: 503 Service Unavailable\r\nContent-Type: text/plain\r\n\r\n%s\n' "$1"
    rm -f "$reply"
    exit 0
}

# counterd may still be starting right after boot: wait up to 5 s for its FIFO.
i=0
while [ ! -p "$REQ" ]; do
    i=$((i + 1))
    [ "$i" -gt 50 ] && fail "counterd is not running"
    usleep 100000
done
rm -f "$reply"
mkfifo -m 0600 "$reply" || fail "cannot make reply fifo"
command exec 4<>"$reply" || fail "cannot open reply fifo"
echo "$$" 1<>"$REQ"
read -t 10 -r line <&4 || fail "counterd did not answer"
rm -f "$reply"
printf 'Content-Type: text/plain\r\n\r\n%s\n' "$line"
