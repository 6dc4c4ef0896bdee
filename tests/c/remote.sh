# tests/c/remote.sh - the C ABI checks a second time over the network: sourced by
# tests/c/run.sh after the local checks (it uses run.sh's variables and helpers:
# $layout, $work, $root, $vdm, $raw, $wraw, $CAP, $BYTES, $sample, $nbd, VG, ok,
# refused, nbd, run, pass, fail, show, qraw, qmap, compare_blocks, overlay,
# bytes_file).
#
# Servers (started here, stopped at the end; their output in log/*.server.err):
#   plain    vdisk-nbd, non-persistent, on a Unix socket                  (nbd)
#   tls      vdisk-nbd, non-persistent, TLS required, 127.0.0.1:PORT      (nbdssl)
#   rw       vdisk-nbd --persistent --tls=on (TLS offered, plaintext allowed),
#            127.0.0.1:PORT: the write checks and the backup flow, both modes
#   qemu-nbd -r -t serving a VMDK and a qcow2; nbdkit file serving a raw image,
#            plain and (nbdkit's --tls=require) under TLS
# The certificate is self-signed, made with openssl here; clients pin it by its
# SHA-1 thumbprint (openssl x509 -fingerprint -sha1), as VDDK clients pin ESXi's.
#
# For each of nbd and nbdssl: nbdkit_like reads the whole export with ReadAsync
# (bytes equal qemu-img convert -O raw of the served disk) and lists
# QueryAllocatedBlocks (equal to qemu-img map's data, in 128-sector chunks);
# GetTransportMode reports the mode; the sample's -info, -dump (sync Read),
# -readasyncbench and -getallocatedblocks agree, its -clone copies the served disk
# into a local one (file operations like -create are refused); on the persistent export the
# sample's -fill (sync Write) and nbdkit_like's WriteAsync + Flush land in the
# served file (qemu-img compare after the server stopped), and a non-persistent
# export reads back what was written without changing its file; backupFlow's
# remote proxy reads the snapshot, its change ID, allocated blocks and changed
# areas (VdiskExt_) over the connection and the restore is verified. A wrong
# thumbprint, or plaintext against a TLS-only server, fails ConnectEx with a clear
# error before any disk is opened.

echo "== remote: nbd and nbdssl (vdisk-nbd, qemu-nbd, nbdkit)"
vnbd=${VDISK_NBD:-$root/target/release/vdisk-nbd}
R=$work/remote
mkdir -p "$R/ds" "$R/flow-nbd" "$R/flow-nbdssl" "$R/pki"

remote_pids=()
# The AES-GCM tags of nbdssl: a proven false positive, see valgrind.supp.
VG_LOCAL=("${VG[@]}")
if [ ${#VG[@]} -ne 0 ]; then
    VG+=("--suppressions=$here/valgrind.supp")
fi

# serve NAME CMD... : starts a server in the background; $srv is its PID.
serve() {
    local name=$1
    shift
    "$@" >"$work/log/$name.server.out" 2>"$work/log/$name.server.err" &
    srv=$!
    remote_pids+=("$srv")
}

# ready NAME PID [SOCKET]: waits (10 s at most) until the server listens: its
# socket exists, or (TCP) vdisk-nbd printed its address; then $port is its port.
ready() {
    local name=$1 pid=$2 sock=${3:-} i
    port=
    for i in $(seq 100); do
        if ! kill -0 "$pid" 2>/dev/null; then
            break
        fi
        if [ -n "$sock" ]; then
            [ -S "$sock" ] && return 0
        else
            port=$(sed -n 's/.* on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$work/log/$name.server.err")
            [ -n "$port" ] && return 0
        fi
        sleep 0.1
    done
    fail "server $name did not start: $(tail -n 3 "$work/log/$name.server.err")"
    return 1
}

# stop PID: SIGTERM (servers finish requests and close their disks) and wait.
stop() {
    local p rest=()
    kill -TERM "$1" 2>/dev/null
    wait "$1" 2>/dev/null
    for p in "${remote_pids[@]}"; do
        [ "$p" != "$1" ] && rest+=("$p")
    done
    remote_pids=("${rest[@]}")
}

remote_stop_all() {
    while [ ${#remote_pids[@]} -ne 0 ]; do
        stop "${remote_pids[0]}"
    done
}
trap remote_stop_all EXIT

# rcheck NAME EXPORT EXPECT_RAW MAP_JSON WORDS...: nbdkit_like over a server
# (WORDS: server=, port=, thumbprint=, transports=, mode=, ...): ReadAsync of the
# whole export equals EXPECT_RAW, QueryAllocatedBlocks equals MAP_JSON's data.
rcheck() {
    local name=$1 export=$2 expect=$3 map=$4 cap mode
    shift 4
    nbd "$name" "$nbd" "$layout" "$export" "$work/$name.out.raw" - "$work/$name.blocks" "$@" ||
        return 1
    mode=$(sed -n 's/^transport mode: //p' "$work/log/$name.out")
    if cmp -s "$work/$name.out.raw" "$expect"; then
        pass "$name: ReadAsync of the whole export ($mode) equals qemu-img convert -O raw"
    else
        fail "$name: data read ($mode) differs from qemu-img's ($(cmp "$work/$name.out.raw" "$expect" 2>&1 | head -n 1))"
    fi
    rm -f "$work/$name.out.raw"
    cap=$(sed -n 's/^capacity: \([0-9]*\) sectors/\1/p' "$work/log/$name.out")
    if compare_blocks "$name" "$work/$name.blocks" "$map" "$cap" >"$work/log/$name.blocks.cmp" 2>&1; then
        pass "$name: QueryAllocatedBlocks ($mode) matches qemu-img map ($(grep -c '^block' "$work/$name.blocks") blocks)"
    else
        fail "$name: QueryAllocatedBlocks ($mode) differs from qemu-img map"
        cat "$work/log/$name.blocks.cmp"
    fi
}

# Every check; returns early (1) when a server or fixture cannot be made.
remote_checks() {
    # ---------------------------------------------------------------------------
    # Fixtures, certificate, servers
    # ---------------------------------------------------------------------------

    for tool in openssl qemu-nbd nbdkit; do
        if ! command -v "$tool" >/dev/null 2>&1; then
            fail "remote: $tool is required (run-tests.sh installs it)"
            return 1
        fi
    done
    if [ ! -x "$vnbd" ]; then
        fail "remote: $vnbd not found (cargo build --release -p vdisk-utils)"
        return 1
    fi

    "$vdm" convert -f raw -O vmdk -t 0 "$raw" "$R/ds/data.vmdk" >/dev/null 2>&1
    cp "$R/ds/data.vmdk" "$R/scratch.vmdk"
    (
        cd "$R/ds" &&
            qemu-img create -q -f vmdk -b data.vmdk -F vmdk child.vmdk &&
            qemu-io -f vmdk -c 'write -q -P 0x61 1M 2M' -c 'write -q -P 0x62 40M 64k' child.vmdk
    ) >"$work/log/remote-fixture.err" 2>&1 || fail "remote fixture: $(cat "$work/log/remote-fixture.err")"
    qraw "$R/ds/data.vmdk" "$R/data.raw"
    qraw "$R/ds/child.vmdk" "$R/child.raw"
    qmap "$R/ds/data.vmdk" "$R/data.map.json"
    qmap "$R/ds/child.vmdk" "$R/child.map.json"
    local_gab=$work/log/r-local-gab.out
    ok r-local-gab "$sample" -getallocatedblocks "$R/ds/data.vmdk"
    # The other servers' images: qemu-img's own VMDK, a qcow2, a sparse raw.
    qemu-img convert -f raw -O vmdk "$raw" "$R/q.vmdk"
    qemu-img convert -f raw -O qcow2 "$raw" "$R/q.qcow2"
    cp --sparse=always "$raw" "$R/q.raw"
    for f in q.vmdk q.qcow2 q.raw; do
        qraw "$R/$f" "$R/$f.raw"
        qmap "$R/$f" "$R/$f.map.json"
    done

    # A self-signed server certificate (as an ESXi host's), pinned by thumbprint.
    if ! openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=localhost \
        -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
        -addext basicConstraints=critical,CA:FALSE \
        -addext keyUsage=critical,digitalSignature,keyEncipherment \
        -addext extendedKeyUsage=serverAuth \
        -keyout "$R/pki/server-key.pem" -out "$R/pki/server-cert.pem" \
        >"$work/log/remote-openssl.err" 2>&1; then
        fail "remote: openssl could not make a certificate: $(tail -n 3 "$work/log/remote-openssl.err")"
        return 1
    fi
    cp "$R/pki/server-cert.pem" "$R/pki/ca-cert.pem" # nbdkit's --tls-certificates folder
    thumb=$(openssl x509 -in "$R/pki/server-cert.pem" -noout -fingerprint -sha1 | sed 's/.*=//')
    thumb256=$(openssl x509 -in "$R/pki/server-cert.pem" -noout -fingerprint -sha256 | sed 's/.*=//')
    # A SHA-1 in the same form, of something else.
    wrong=$(printf 'not the server certificate' | openssl sha1 -c | sed 's/.*= *//' | tr a-f A-F)
    echo "server certificate SHA-1 thumbprint $thumb"

    tls_args=(--tls-cert "$R/pki/server-cert.pem" --tls-key "$R/pki/server-key.pem")
    exports=(--export "data=$R/ds/data.vmdk" --export "child=$R/ds/child.vmdk"
        --export "scratch=$R/scratch.vmdk" --datastore "ds=$R/ds")

    serve plain "$vnbd" --socket "$R/plain.sock" "${exports[@]}"
    ready plain "$srv" "$R/plain.sock" || return 1
    serve tls "$vnbd" --bind 127.0.0.1 --port 0 "${tls_args[@]}" "${exports[@]}"
    ready tls "$srv" || return 1
    tls_port=$port

    # The persistent server: a copy of the data disk per mode, and the backup flows.
    for m in nbd nbdssl; do
        cp "$R/ds/data.vmdk" "$R/w-$m.vmdk"
    done
    serve rw "$vnbd" --persistent --bind 127.0.0.1 --port 0 "${tls_args[@]}" --tls=on \
        --export "w-nbd=$R/w-nbd.vmdk" --export "w-nbdssl=$R/w-nbdssl.vmdk" \
        --datastore "flow-nbd=$R/flow-nbd" --datastore "flow-nbdssl=$R/flow-nbdssl"
    rw_pid=$srv
    ready rw "$srv" || return 1
    rw_port=$port

    # How each mode reaches each server: nbdkit_like words and sample options.
    plain_words=("server=unix:$R/plain.sock" transports=nbd mode=nbd user=root password=secret
        vm=moref=vm-1)
    tls_words=(server=127.0.0.1 "port=$tls_port" "thumbprint=$thumb" transports=nbdssl:nbd mode=nbdssl
        user=root password=secret vm=moref=vm-1)
    plain_opts=(-host "unix:$R/plain.sock" -mode nbd)
    tls_opts=(-host 127.0.0.1 -port "$tls_port" -thumb "$thumb" -mode nbdssl:nbd)

    # ---------------------------------------------------------------------------
    # Reads, allocated blocks, transport mode, per mode
    # ---------------------------------------------------------------------------

    for m in nbd nbdssl; do
        if [ $m = nbd ]; then
            words=("${plain_words[@]}")
            opts=("${plain_opts[@]}")
        else
            words=("${tls_words[@]}")
            opts=("${tls_opts[@]}")
        fi
        rcheck "r-$m-data" data "$R/data.raw" "$R/data.map.json" ro "${words[@]}"
        grep -qx "transport mode: $m" "$work/log/r-$m-data.out" &&
            pass "r-$m-data: GetTransportMode = $m" ||
            fail "r-$m-data: $(grep '^transport mode' "$work/log/r-$m-data.out")"
        # A chain, served as one disk, named as a datastore names it.
        rcheck "r-$m-chain" "[ds] child.vmdk" "$R/child.raw" "$R/child.map.json" ro "${words[@]}"

        if ok "r-$m-info" "$sample" "${opts[@]}" -user root -password secret -vm moref=vm-1 -info data; then
            if grep -q "^capacity *= $CAP sectors" "$work/log/r-$m-info.out" &&
                grep -q "^transport mode *= $m\$" "$work/log/r-$m-info.out"; then
                pass "r-$m: sample -info: capacity $CAP, transport mode = $m"
            else
                fail "r-$m: sample -info: $(grep -E '^(capacity|transport mode)' "$work/log/r-$m-info.out" | tr '\n' ' ')"
            fi
        fi
        if ok "r-$m-dump" "$sample" "${opts[@]}" -dump -start 10247 -count 20 data; then
            xxd -g1 -s $((10247 * 512)) -l $((20 * 512)) "$raw" | cmp -s - "$work/log/r-$m-dump.out" &&
                pass "r-$m: sample -dump (Read) equals xxd of the data" ||
                fail "r-$m: sample -dump differs from xxd -g1 of the raw data"
        fi
        if ok "r-$m-readasyncbench" "$sample" "${opts[@]}" -readasyncbench 256 data; then
            grep -q "^readasyncbench: $BYTES bytes" "$work/log/r-$m-readasyncbench.out" &&
                pass "r-$m: sample -readasyncbench 256 ($(sed -n 's/^readasyncbench: //p' "$work/log/r-$m-readasyncbench.out"))" ||
                fail "r-$m: -readasyncbench output: $(cat "$work/log/r-$m-readasyncbench.out")"
        fi
        if ok "r-$m-gab" "$sample" "${opts[@]}" -getallocatedblocks data; then
            if diff -q <(grep -E '^(0x|allocated)' "$local_gab") \
                <(grep -E '^(0x|allocated)' "$work/log/r-$m-gab.out") >/dev/null; then
                pass "r-$m: sample -getallocatedblocks equals the local disk's ($(grep '^allocated' "$work/log/r-$m-gab.out"))"
            else
                fail "r-$m: sample -getallocatedblocks differs from the local disk's"
                diff <(grep -E '^(0x|allocated)' "$local_gab") <(grep -E '^(0x|allocated)' "$work/log/r-$m-gab.out") | head -n 6
            fi
        fi

        # Clone: the server's disk into a new local one.
        if ok "r-$m-clone" "$sample" "${opts[@]}" -clone data "$R/clone-$m.vmdk"; then
            qemu-img compare -q -f raw -F vmdk "$R/data.raw" "$R/clone-$m.vmdk" &&
                pass "r-$m: sample -clone (Clone from the remote connection) equals the served disk" ||
                fail "r-$m: the clone differs from the served disk (qemu-img compare)"
        fi

        # A non-persistent export: what is written reads back, the file never changes.
        sum=$(sha256sum <"$R/scratch.vmdk")
        cp "$R/data.raw" "$R/scratch-expect.raw"
        dd if="$wraw" of="$R/scratch-expect.raw" conv=notrunc status=none
        wlen=$(stat -c %s "$wraw")
        pad=$(((512 - wlen % 512) % 512))
        dd if=/dev/zero of="$R/scratch-expect.raw" bs=1 seek="$wlen" count="$pad" conv=notrunc status=none
        if nbd "r-$m-scratch" "$nbd" "$layout" scratch "$work/r-$m-scratch.raw" "$wraw" - rw "${words[@]}"; then
            cmp -s "$work/r-$m-scratch.raw" "$R/scratch-expect.raw" &&
                [ "$(sha256sum <"$R/scratch.vmdk")" = "$sum" ] &&
                pass "r-$m: WriteAsync to a non-persistent export reads back, its file unchanged" ||
                fail "r-$m: non-persistent export: read back differs or the file changed"
        fi
        rm -f "$work/r-$m-scratch.raw" "$R/scratch-expect.raw"
    done

    # ---------------------------------------------------------------------------
    # Connection parameters and refusals
    # ---------------------------------------------------------------------------

    # ok_mode NAME MODE WHAT SAMPLE-ARGS...: the sample's -info over a server
    # reports transport MODE.
    ok_mode() {
        local name=$1 mode=$2 what=$3
        shift 3
        ok "$name" "$sample" "$@" -info data || return 0
        if grep -q "^transport mode *= $mode\$" "$work/log/$name.out"; then
            pass "$what"
        else
            fail "$what: $(grep '^transport mode' "$work/log/$name.out")"
        fi
    }
    # clear_refusal NAME WHAT PATTERN: the refusal came from ConnectEx (before any
    # Open), and its message matches PATTERN.
    clear_refusal() {
        local name=$1 what=$2 pattern=$3 log=$work/log/$1.err
        if grep -q 'VixDiskLib_ConnectEx' "$log" && grep -qi "$pattern" "$log" &&
            ! grep -q 'VixDiskLib_Open' "$log"; then
            pass "$what: $(grep -i -m 1 "$pattern" "$log" | cut -c 1-150)"
        else
            fail "$what: not a clear ConnectEx failure"
            show "$name"
        fi
    }

    ok_mode r-uri nbdssl "serverName as an NBD URI (nbds://...), the Open path names the export" \
        -host "nbds://127.0.0.1:$tls_port/ignored" -thumb "$thumb"
    ok_mode r-nfcport nbdssl "nfcHostPort is used before port" \
        -host 127.0.0.1 -port 1 -nfchostport "$tls_port" -thumb "$thumb"
    ok_mode r-sha256 nbdssl "a SHA-256 thumbprint pins the certificate too" \
        -host localhost -port "$tls_port" -thumb "$thumb256"
    ok_mode r-default-mode nbdssl "default transport modes with a thumbprint: nbdssl" \
        -host 127.0.0.1 -port "$tls_port" -thumb "$thumb" -connectex
    ok_mode r-default-plain nbd "default transport modes without a thumbprint, plaintext server: nbd" \
        -host "unix:$R/plain.sock" -connectex

    refused r-wrong-thumb "$sample" -host 127.0.0.1 -port "$tls_port" -thumb "$wrong" -info data &&
        clear_refusal r-wrong-thumb "a wrong thumbprint fails ConnectEx" 'thumbprint is'
    if refused r-wrong-thumb-nbdkit "$nbd" "$layout" data - - - ro server=127.0.0.1 "port=$tls_port" \
        "thumbprint=$wrong" transports=nbdssl:nbd; then
        if grep -q '^FAIL: VixDiskLib_ConnectEx' "$work/log/r-wrong-thumb-nbdkit.out" &&
            ! grep -q '^transport mode:' "$work/log/r-wrong-thumb-nbdkit.out"; then
            pass "nbdkit_like: a wrong thumbprint fails ConnectEx"
        else
            fail "nbdkit_like: a wrong thumbprint did not fail ConnectEx"
            show r-wrong-thumb-nbdkit
        fi
    fi
    refused r-plain-to-tls "$sample" -host 127.0.0.1 -port "$tls_port" -mode nbd -info data &&
        clear_refusal r-plain-to-tls "transport nbd to a TLS-only server fails ConnectEx" 'requires TLS'
    refused r-file-mode "$sample" "${plain_opts[@]}" -mode file -info data &&
        clear_refusal r-file-mode "transport modes without nbd or nbdssl for a server" 'none of the transport modes'
    refused r-no-server "$sample" -host "unix:$R/no-such.sock" -info data &&
        clear_refusal r-no-server "a server that is not there fails ConnectEx" 'no-such.sock'
    if refused r-create "$sample" "${plain_opts[@]}" -create -cap 16 "$R/not-created.vmdk" &&
        refused r-check "$sample" "${plain_opts[@]}" -check 0 data; then
        if grep -q 'VixError 6)' "$work/log/r-create.err" && grep -q 'VixError 6)' "$work/log/r-check.err" &&
            [ ! -e "$R/not-created.vmdk" ]; then
            pass "file operations (Create, CheckRepair) on a remote connection: VIX_E_NOT_SUPPORTED, no local file touched"
        else
            fail "file operations on a remote connection: $(grep -h '^Error' "$work/log/r-create.err" "$work/log/r-check.err")"
        fi
    fi
    if refused r-missing-export "$sample" "${plain_opts[@]}" -info no-such-export; then
        grep -q 'VixError 4)' "$work/log/r-missing-export.err" &&
            pass "a missing export: Open fails with VIX_E_FILE_NOT_FOUND" ||
            fail "a missing export: $(grep '^Error' "$work/log/r-missing-export.err")"
    fi

    # ---------------------------------------------------------------------------
    # Writes to a persistent export, and the backup flow (CBT), per mode
    # ---------------------------------------------------------------------------

    for m in nbd nbdssl; do
        if [ $m = nbd ]; then
            words=(server=127.0.0.1 "port=$rw_port" transports=nbd mode=nbd)
            opts=(-host 127.0.0.1 -port "$rw_port" -mode nbd)
        else
            words=(server=127.0.0.1 "port=$rw_port" "thumbprint=$thumb" mode=nbdssl)
            opts=(-host 127.0.0.1 -port "$rw_port" -thumb "$thumb" -mode nbdssl)
        fi
        # Sync writes (-fill: a partial grain, the last sector), then WriteAsync of
        # the write file over the start of the disk, Flush, and the whole disk read back.
        cp "$R/data.raw" "$R/w-$m.expect.raw"
        bytes_file "$R/fill.bin" 1536 '\132'
        overlay "$R/w-$m.expect.raw" "$R/fill.bin" 40000
        bytes_file "$R/fill.bin" 512 '\001'
        overlay "$R/w-$m.expect.raw" "$R/fill.bin" $((CAP - 1))
        dd if="$wraw" of="$R/w-$m.expect.raw" conv=notrunc status=none
        wlen=$(stat -c %s "$wraw")
        pad=$(((512 - wlen % 512) % 512))
        dd if=/dev/zero of="$R/w-$m.expect.raw" bs=1 seek="$wlen" count="$pad" conv=notrunc status=none
        ok "rw-$m-fill" "$sample" "${opts[@]}" -fill -start 40000 -count 3 -val 0x5a "w-$m" &&
            ok "rw-$m-fill2" "$sample" "${opts[@]}" -fill -start $((CAP - 1)) -count 1 -val 1 "w-$m" &&
            pass "rw-$m: sample -fill (Write) over $m"
        if nbd "rw-$m-write" "$nbd" "$layout" "w-$m" "$work/rw-$m.raw" "$wraw" "$work/rw-$m.blocks" rw "${words[@]}"; then
            cmp -s "$work/rw-$m.raw" "$R/w-$m.expect.raw" &&
                pass "rw-$m: WriteAsync + Wait + Flush, read back equals what was written" ||
                fail "rw-$m: read back after the writes differs ($(cmp "$work/rw-$m.raw" "$R/w-$m.expect.raw" 2>&1 | head -n 1))"
        fi
        rm -f "$work/rw-$m.raw"

        # The backup flow, its proxy remote: snapshot read, change ID, allocated blocks
        # and changed areas over the connection (the server is persistent: it closes
        # the disk when the proxy leaves, so the flow can consolidate into it).
        flowopts=(-mib 64 -host 127.0.0.1 -port "$rw_port" -datastore "flow-$m" -mode "$m")
        [ $m = nbdssl ] && flowopts+=(-thumb "$thumb")
        if ok "rw-$m-flow" "$work/bin/backupFlow" "$R/flow-$m" "${flowopts[@]}"; then
            if grep -q '^Backup flow verified.$' "$work/log/rw-$m-flow.out" &&
                grep -q 'changed since the last backup' "$work/log/rw-$m-flow.out" &&
                [ "$(grep -c "transport mode $m)" "$work/log/rw-$m-flow.out")" -ge 2 ]; then
                pass "rw-$m: backup flow with a remote proxy (VdiskExt_GetChangeId, QueryChangedAreas over $m): restore verified"
            else
                fail "rw-$m: backup flow: no verified restore over $m in its output"
                show "rw-$m-flow"
            fi
            qemu-img compare -q "$R/flow-$m/backup-2.vmdk" "$R/flow-$m/restored-incremental.vmdk" &&
                pass "rw-$m: qemu-img reads the incremental backup chain as the restored disk" ||
                fail "rw-$m: qemu-img disagrees with the incremental backup chain"
        fi
    done

    # The served files, once the server has closed them.
    stop "$rw_pid"
    for m in nbd nbdssl; do
        qemu-img compare -q -f raw -F vmdk "$R/w-$m.expect.raw" "$R/w-$m.vmdk" &&
            pass "rw-$m: the served file after the writes equals them (qemu-img compare)" ||
            fail "rw-$m: qemu-img compare of the served file differs"
        qemu-img check -q "$R/w-$m.vmdk" || fail "rw-$m: qemu-img check fails on the served file"
        qmap "$R/w-$m.vmdk" "$R/w-$m.map.json"
        compare_blocks "rw-$m" "$work/rw-$m.blocks" "$R/w-$m.map.json" $CAP >"$work/log/rw-$m.cmp" 2>&1 &&
            pass "rw-$m: QueryAllocatedBlocks after the writes matches qemu-img map of the file" ||
            { fail "rw-$m: blocks after the writes differ from qemu-img map"; cat "$work/log/rw-$m.cmp"; }
    done

    # ---------------------------------------------------------------------------
    # Other servers: qemu-nbd (VMDK, qcow2) and nbdkit file (raw, plain and TLS)
    # ---------------------------------------------------------------------------

    serve qemu-vmdk qemu-nbd -r -t -f vmdk -x disk -k "$R/qemu-vmdk.sock" "$R/q.vmdk"
    ready qemu-vmdk "$srv" "$R/qemu-vmdk.sock" &&
        rcheck qemu-nbd-vmdk disk "$R/q.vmdk.raw" "$R/q.vmdk.map.json" ro \
            "server=unix:$R/qemu-vmdk.sock" transports=nbd mode=nbd
    serve qemu-qcow2 qemu-nbd -r -t -f qcow2 -x disk -k "$R/qemu-qcow2.sock" "$R/q.qcow2"
    ready qemu-qcow2 "$srv" "$R/qemu-qcow2.sock" &&
        rcheck qemu-nbd-qcow2 disk "$R/q.qcow2.raw" "$R/q.qcow2.map.json" ro \
            "server=unix:$R/qemu-qcow2.sock" transports=nbd mode=nbd
    serve nbdkit-file nbdkit -f -r -U "$R/nbdkit.sock" file "$R/q.raw"
    ready nbdkit-file "$srv" "$R/nbdkit.sock" &&
        rcheck nbdkit-file disk "$R/q.raw.raw" "$R/q.raw.map.json" ro anyexport \
            "server=unix:$R/nbdkit.sock" transports=nbd mode=nbd
    serve nbdkit-tls nbdkit -f -r -U "$R/nbdkit-tls.sock" --tls=require \
        "--tls-certificates=$R/pki" file "$R/q.raw"
    ready nbdkit-tls "$srv" "$R/nbdkit-tls.sock" &&
        rcheck nbdkit-file-tls disk "$R/q.raw.raw" "$R/q.raw.map.json" ro anyexport \
            "server=unix:$R/nbdkit-tls.sock" "thumbprint=$thumb" mode=nbdssl
}

remote_checks
remote_stop_all
trap - EXIT
VG=("${VG_LOCAL[@]}")
rm -f "$R"/*.raw
