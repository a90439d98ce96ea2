#!/bin/sh
# Service: busybox httpd on guest port 80, serving /www (CGIs in /www/cgi-bin).
exec httpd -f -p 80 -h /www
