/* The benchmark's application: real libpcsclite calls, timed here, printed as one JSON line.
 *
 * The socket comes from PCSCLITE_CSOCK_NAME, as for any pcsc-lite application.
 *
 *   client transmit READER N [AID]
 *                                N x SCardTransmit(ECHO 80 EE 00 00 04 01 02 03 04), ns each;
 *                                with AID (hex), a SELECT of that application first (untimed)
 *   client status READER N       N x SCardStatus, ns each
 *   client estrel N              N x (SCardEstablishContext + SCardReleaseContext), ns each
 *   client session READER REPS   REPS x the standard session (establish, list readers,
 *                                connect, 10 x ECHO, disconnect, release), ns per step
 *   client load READER CONTEXTS START_NS DURATION_MS
 *                                CONTEXTS threads, each with its own context and card
 *                                handle, loop ECHO from CLOCK_REALTIME START_NS for
 *                                DURATION_MS; prints the number of completed round trips
 *                                and how many contexts could not be opened (and why)
 *   client wait READER TIMEOUT_MS
 *                                waits until READER shows a card; prints whether it did
 *
 * The timed subcommands' JSON also says which client library answered: "pid", "libc" (the C
 * library's version) and "libs", every loaded object whose name contains "pcsclite", with
 * its path and device:inode as this process sees them (so a run inside a chroot or with
 * LD_LIBRARY_PATH can be checked against the files it was meant to load).
 *
 * Timing uses CLOCK_MONOTONIC around each library call only, so this program's own work
 * (allocation, JSON) is outside the figures.  Exit status 0 on success, 1 on a PC/SC error
 * (the JSON line then carries "error" and the call's return code).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <gnu/libc-version.h>
#include <link.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <winscard.h>

#define WARMUP 20
#define SESSION_APDUS 10
#define SESSION_STEPS 6 /* establish, list, connect, apdus, disconnect, release */

static const BYTE ECHO[] = {0x80, 0xEE, 0x00, 0x00, 0x04, 0x01, 0x02, 0x03, 0x04};
static const BYTE ECHO_REPLY[] = {0x01, 0x02, 0x03, 0x04, 0x90, 0x00};

static int64_t mono_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static int64_t real_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void fail(const char *call, LONG rv) {
    printf("{\"error\": \"%s\", \"code\": \"0x%08lX\"}\n", call, (unsigned long)rv);
    fflush(stdout);
    exit(1);
}

static void check(const char *call, LONG rv) {
    if (rv != SCARD_S_SUCCESS)
        fail(call, rv);
}

static int print_lib(struct dl_phdr_info *info, size_t size, void *arg) {
    int *count = arg;
    struct stat st;
    (void)size;
    if (!info->dlpi_name || !strstr(info->dlpi_name, "pcsclite"))
        return 0;
    if (stat(info->dlpi_name, &st) != 0)
        memset(&st, 0, sizeof st);
    printf("%s{\"path\": \"%s\", \"dev\": %llu, \"ino\": %llu}", (*count)++ ? ", " : "",
           info->dlpi_name, (unsigned long long)st.st_dev, (unsigned long long)st.st_ino);
    return 0;
}

static void print_ns(const char *key, const int64_t *v, long n) {
    int count = 0;
    printf("{\"%s\": [", key);
    for (long i = 0; i < n; i++)
        printf(i ? ",%lld" : "%lld", (long long)v[i]);
    printf("], \"pid\": %ld, \"libc\": \"%s\", \"libs\": [", (long)getpid(),
           gnu_get_libc_version());
    dl_iterate_phdr(print_lib, &count);
    printf("]}\n");
}

static long echo(SCARDHANDLE card) {
    BYTE out[258];
    DWORD len = sizeof out;
    SCARD_IO_REQUEST recv_pci;
    LONG rv = SCardTransmit(card, SCARD_PCI_T1, ECHO, sizeof ECHO, &recv_pci, out, &len);
    if (rv != SCARD_S_SUCCESS)
        return rv;
    if (len != sizeof ECHO_REPLY || memcmp(out, ECHO_REPLY, len) != 0)
        return -1;
    return 0;
}

static void open_card(const char *reader, SCARDCONTEXT *ctx, SCARDHANDLE *card) {
    DWORD proto;
    check("SCardEstablishContext", SCardEstablishContext(SCARD_SCOPE_SYSTEM, NULL, NULL, ctx));
    check("SCardConnect", SCardConnect(*ctx, reader, SCARD_SHARE_SHARED, SCARD_PROTOCOL_T1,
                                       card, &proto));
}

static void close_card(SCARDCONTEXT ctx, SCARDHANDLE card) {
    check("SCardDisconnect", SCardDisconnect(card, SCARD_LEAVE_CARD));
    check("SCardReleaseContext", SCardReleaseContext(ctx));
}

/* SELECT by DF name (00 A4 04 00 Lc AID) of the application whose AID is in hex in aid:
 * the card must answer 61 xx or 90 00. */
static void select_aid(SCARDHANDLE card, const char *aid) {
    BYTE cmd[5 + 16] = {0x00, 0xA4, 0x04, 0x00}, out[258];
    DWORD len = sizeof out;
    size_t n = strlen(aid) / 2;
    unsigned int byte;
    SCARD_IO_REQUEST recv_pci;
    if (n < 1 || n > 16 || strlen(aid) % 2)
        fail("SELECT (AID of 1 to 16 bytes in hex)", -1);
    for (size_t i = 0; i < n; i++) {
        if (sscanf(aid + 2 * i, "%2x", &byte) != 1)
            fail("SELECT (AID of 1 to 16 bytes in hex)", -1);
        cmd[5 + i] = (BYTE)byte;
    }
    cmd[4] = (BYTE)n;
    check("SCardTransmit", SCardTransmit(card, SCARD_PCI_T1, cmd, 5 + n, &recv_pci, out,
                                         &len));
    if (len < 2 || !(out[len - 2] == 0x61 || (out[len - 2] == 0x90 && out[len - 1] == 0)))
        fail("SELECT", (LONG)(out[len - 2] << 8 | out[len - 1]));
}

static int do_transmit(const char *reader, long n, int status, const char *aid) {
    SCARDCONTEXT ctx;
    SCARDHANDLE card;
    int64_t *t = calloc(n, sizeof *t);
    open_card(reader, &ctx, &card);
    if (aid)
        select_aid(card, aid);
    for (long i = -WARMUP; i < n; i++) {
        int64_t t0 = mono_ns();
        LONG rv;
        if (status) {
            char name[256];
            DWORD name_len = sizeof name, state, proto, atr_len = MAX_ATR_SIZE;
            BYTE atr[MAX_ATR_SIZE];
            rv = SCardStatus(card, name, &name_len, &state, &proto, atr, &atr_len);
        } else {
            rv = echo(card);
        }
        int64_t t1 = mono_ns();
        if (rv != 0)
            fail(status ? "SCardStatus" : "SCardTransmit", rv);
        if (i >= 0)
            t[i] = t1 - t0;
    }
    close_card(ctx, card);
    print_ns("ns", t, n);
    return 0;
}

static int do_estrel(long n) {
    int64_t *t = calloc(n, sizeof *t);
    for (long i = -WARMUP; i < n; i++) {
        SCARDCONTEXT ctx;
        int64_t t0 = mono_ns();
        LONG rv = SCardEstablishContext(SCARD_SCOPE_SYSTEM, NULL, NULL, &ctx);
        if (rv != SCARD_S_SUCCESS)
            fail("SCardEstablishContext", rv);
        rv = SCardReleaseContext(ctx);
        int64_t t1 = mono_ns();
        if (rv != SCARD_S_SUCCESS)
            fail("SCardReleaseContext", rv);
        if (i >= 0)
            t[i] = t1 - t0;
    }
    print_ns("ns", t, n);
    return 0;
}

static int do_session(const char *reader, long reps) {
    int64_t *t = calloc(reps * SESSION_STEPS, sizeof *t);
    for (long r = 0; r < reps; r++) {
        SCARDCONTEXT ctx;
        SCARDHANDLE card;
        DWORD proto, len;
        char readers[4096];
        int64_t *s = t + r * SESSION_STEPS, m0 = mono_ns(), m;
        check("SCardEstablishContext",
              SCardEstablishContext(SCARD_SCOPE_SYSTEM, NULL, NULL, &ctx));
        m = mono_ns(); s[0] = m - m0; m0 = m;
        len = sizeof readers;
        check("SCardListReaders", SCardListReaders(ctx, NULL, readers, &len));
        m = mono_ns(); s[1] = m - m0; m0 = m;
        check("SCardConnect", SCardConnect(ctx, reader, SCARD_SHARE_SHARED, SCARD_PROTOCOL_T1,
                                           &card, &proto));
        m = mono_ns(); s[2] = m - m0; m0 = m;
        for (int i = 0; i < SESSION_APDUS; i++) {
            LONG rv = echo(card);
            if (rv != 0)
                fail("SCardTransmit", rv);
        }
        m = mono_ns(); s[3] = m - m0; m0 = m;
        check("SCardDisconnect", SCardDisconnect(card, SCARD_LEAVE_CARD));
        m = mono_ns(); s[4] = m - m0; m0 = m;
        check("SCardReleaseContext", SCardReleaseContext(ctx));
        m = mono_ns(); s[5] = m - m0;
    }
    print_ns("steps_ns", t, reps * SESSION_STEPS);
    return 0;
}

struct worker {
    pthread_t thread;
    const char *reader;
    int64_t start_mono, end_mono;
    long count, errors;
    LONG first_error;
    const char *failed; /* the call that could not open this context, or NULL */
    int late;
};

static void *load_worker(void *arg) {
    struct worker *w = arg;
    SCARDCONTEXT ctx;
    SCARDHANDLE card;
    DWORD proto;
    LONG rv = SCardEstablishContext(SCARD_SCOPE_SYSTEM, NULL, NULL, &ctx);
    if (rv != SCARD_S_SUCCESS) {
        w->failed = "SCardEstablishContext";
        w->first_error = rv;
        return NULL;
    }
    rv = SCardConnect(ctx, w->reader, SCARD_SHARE_SHARED, SCARD_PROTOCOL_T1, &card, &proto);
    if (rv != SCARD_S_SUCCESS) {
        w->failed = "SCardConnect";
        w->first_error = rv;
        SCardReleaseContext(ctx);
        return NULL;
    }
    int64_t now = mono_ns();
    if (now > w->start_mono)
        w->late = 1;
    else {
        struct timespec d = {(w->start_mono - now) / 1000000000LL,
                             (w->start_mono - now) % 1000000000LL};
        while (nanosleep(&d, &d) == -1 && errno == EINTR)
            ;
    }
    while (mono_ns() < w->end_mono) {
        LONG rv = echo(card);
        if (rv == 0)
            w->count++;
        else if (w->errors++ == 0)
            w->first_error = rv;
    }
    SCardDisconnect(card, SCARD_LEAVE_CARD);
    SCardReleaseContext(ctx);
    return NULL;
}

static int do_load(const char *reader, int contexts, int64_t start_real, long duration_ms) {
    struct worker *w = calloc(contexts, sizeof *w);
    int64_t start = mono_ns() + (start_real - real_ns());
    long count = 0, errors = 0, late = 0, failed = 0;
    LONG first_error = 0;
    const char *failed_call = "";
    for (int i = 0; i < contexts; i++) {
        w[i] = (struct worker){.reader = reader, .start_mono = start,
                               .end_mono = start + duration_ms * 1000000LL};
        pthread_create(&w[i].thread, NULL, load_worker, &w[i]);
    }
    for (int i = 0; i < contexts; i++) {
        pthread_join(w[i].thread, NULL);
        count += w[i].count;
        errors += w[i].errors;
        late += w[i].late;
        if (w[i].failed && !failed++)
            failed_call = w[i].failed;
        if (!first_error)
            first_error = w[i].first_error;
    }
    printf("{\"count\": %ld, \"errors\": %ld, \"failed_contexts\": %ld, \"failed_call\": "
           "\"%s\", \"first_error\": \"0x%08lX\", \"late\": %ld}\n",
           count, errors, failed, failed_call, (unsigned long)first_error, late);
    return 0;
}

static int do_wait(const char *reader, long timeout_ms) {
    SCARDCONTEXT ctx;
    int64_t deadline = mono_ns() + timeout_ms * 1000000LL;
    check("SCardEstablishContext", SCardEstablishContext(SCARD_SCOPE_SYSTEM, NULL, NULL, &ctx));
    for (;;) {
        SCARD_READERSTATE rs = {.szReader = reader, .dwCurrentState = SCARD_STATE_UNAWARE};
        LONG rv = SCardGetStatusChange(ctx, 0, &rs, 1);
        if (rv != SCARD_S_SUCCESS && rv != SCARD_E_TIMEOUT)
            fail("SCardGetStatusChange", rv);
        int present = rv == SCARD_S_SUCCESS && (rs.dwEventState & SCARD_STATE_PRESENT);
        if (present || mono_ns() > deadline) {
            printf("{\"present\": %s, \"state\": %lu}\n", present ? "true" : "false",
                   (unsigned long)rs.dwEventState);
            SCardReleaseContext(ctx);
            return 0;
        }
        struct timespec d = {0, 50000000};
        nanosleep(&d, NULL);
    }
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOFBF, 1 << 16);
    if ((argc == 4 || argc == 5) && !strcmp(argv[1], "transmit"))
        return do_transmit(argv[2], atol(argv[3]), 0, argc == 5 ? argv[4] : NULL);
    if (argc == 4 && !strcmp(argv[1], "status"))
        return do_transmit(argv[2], atol(argv[3]), 1, NULL);
    if (argc == 3 && !strcmp(argv[1], "estrel"))
        return do_estrel(atol(argv[2]));
    if (argc == 4 && !strcmp(argv[1], "session"))
        return do_session(argv[2], atol(argv[3]));
    if (argc == 6 && !strcmp(argv[1], "load"))
        return do_load(argv[2], atoi(argv[3]), atoll(argv[4]), atol(argv[5]));
    if (argc == 4 && !strcmp(argv[1], "wait"))
        return do_wait(argv[2], atol(argv[3]));
    fprintf(stderr, "usage: see the comment at the top of benchmarks/client.c\n");
    return 2;
}
