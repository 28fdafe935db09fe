/* A floor for the stream benchmark (not part of the product): the least a
 * BLIN stream relay written in C does per read batch, with nothing of the
 * daemon around it.
 *
 *     floor_relay LISTEN_PATH TARGET_PATH [RING_BYTES]
 *
 * Accepts one guest on LISTEN_PATH (a Unix socket), connects to TARGET_PATH
 * (the subscriber) and, like `socat -b 262144`, reads up to 256 KiB at a time
 * after poll(2) says the guest is readable. Unlike socat it parses every frame
 * (the header checks of csrc/blin.c, inlined), writes whole frames only (a
 * frame cut by the end of a read moves to the front of the buffer), copies
 * each batch into a scrollback ring of RING_BYTES (1 MiB by default; 0: none)
 * and forwards a frame larger than its buffer as it arrives. bench/profile_relay.py
 * runs it beside socat and the daemon (`--relay floor`): its CPU per GB is what
 * a C data plane inside the daemon would come down to at best.
 */
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define BUF (256 * 1024)
#define HDR 20
#define MAX_PAYLOAD (16u * 1024 * 1024)

static uint32_t rd32(const uint8_t *p) { return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24; }

static int known_type(unsigned t)
{
    return t == 0x01 || t == 0x02 || t == 0x03 || t == 0x10 || t == 0x11 || t == 0x12 ||
           t == 0x20 || t == 0x21 || t == 0x30 || t == 0x31;
}

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static void write_all(int fd, const uint8_t *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            die("write");
        }
        p += w;
        n -= (size_t)w;
    }
}

static uint8_t *ring;
static size_t ring_size, ring_pos;

static void keep(const uint8_t *p, size_t n)
{
    if (!ring_size)
        return;
    if (n > ring_size) {
        p += n - ring_size;
        n = ring_size;
    }
    while (n) {
        size_t take = ring_size - ring_pos < n ? ring_size - ring_pos : n;
        memcpy(ring + ring_pos, p, take);
        ring_pos = (ring_pos + take) % ring_size;
        p += take;
        n -= take;
    }
}

static int unix_socket(const char *path, struct sockaddr_un *sa)
{
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0)
        die("socket");
    memset(sa, 0, sizeof *sa);
    sa->sun_family = AF_UNIX;
    strncpy(sa->sun_path, path, sizeof sa->sun_path - 1);
    return fd;
}

int main(int argc, char **argv)
{
    struct sockaddr_un sa;
    static uint8_t buf[BUF];
    size_t start = 0, end = 0, remaining = 0;
    int lfd, gfd, sfd;

    if (argc < 3) {
        fprintf(stderr, "usage: floor_relay LISTEN_PATH TARGET_PATH [RING_BYTES]\n");
        return 2;
    }
    ring_size = argc > 3 ? strtoul(argv[3], NULL, 10) : 1 << 20;
    if (ring_size && !(ring = malloc(ring_size)))
        die("malloc");
    lfd = unix_socket(argv[1], &sa);
    unlink(argv[1]);
    if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(lfd, 1) < 0)
        die("listen");
    if ((gfd = accept(lfd, NULL, NULL)) < 0)
        die("accept");
    close(lfd);
    unlink(argv[1]);
    sfd = unix_socket(argv[2], &sa);
    if (connect(sfd, (struct sockaddr *)&sa, sizeof sa) < 0)
        die("connect");

    for (;;) {
        struct pollfd pfd = {gfd, POLLIN, 0};
        ssize_t n;
        size_t pos;

        if (poll(&pfd, 1, -1) < 0) {
            if (errno == EINTR)
                continue;
            die("poll");
        }
        n = read(gfd, buf + end, BUF - end);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            die("read");
        }
        if (n == 0)
            break;
        end += (size_t)n;
        if (remaining) { /* a frame larger than the buffer: forwarded as it comes */
            size_t take = remaining < end - start ? remaining : end - start;
            keep(buf + start, take);
            write_all(sfd, buf + start, take);
            remaining -= take;
            start += take;
        }
        pos = start;
        while (!remaining && end - pos >= HDR) {
            const uint8_t *p = buf + pos;
            uint32_t len = rd32(p + 8);
            if (rd32(p) != 0x424C494E || p[4] != 1 || !known_type(p[5]) || len > MAX_PAYLOAD) {
                fprintf(stderr, "bad frame at %zu\n", pos);
                return 1;
            }
            if (HDR + (size_t)len > BUF) { /* cut-through: what is here now, the rest as it comes */
                size_t take = end - pos;
                keep(buf + start, take + pos - start);
                write_all(sfd, buf + start, take + pos - start);
                remaining = HDR + (size_t)len - take;
                pos = start = end;
                break;
            }
            if (end - pos < HDR + (size_t)len)
                break;
            pos += HDR + (size_t)len;
        }
        if (pos > start) {
            keep(buf + start, pos - start);
            write_all(sfd, buf + start, pos - start);
            start = pos;
        }
        if (start == end) {
            start = end = 0;
        } else if (BUF - end < 64 * 1024 || remaining) {
            memmove(buf, buf + start, end - start);
            end -= start;
            start = 0;
        }
    }
    close(sfd);
    return 0;
}
