/*
 * The host <-> agent wire format; guest/PROTOCOL.md is the description, and
 * uvmkit/protocol.py the host's copy of these numbers.
 */
#ifndef UVMKIT_PROTOCOL_H
#define UVMKIT_PROTOCOL_H

#define PROTO_MAGIC 0x55564d4bu /* "UVMK" */
#define PROTO_VERSION 1
#define PROTO_HEADER_SIZE 16
#define PROTO_MAX_PAYLOAD (1u << 20)

enum frame_type {
        /* host -> agent */
        FRAME_HELLO = 0x01,
        FRAME_EXEC = 0x02,
        FRAME_READ_FILE = 0x03,
        FRAME_SHUTDOWN = 0x04,

        /* agent -> host */
        FRAME_READY = 0x80,
        FRAME_HELLO_REPLY = 0x81,
        FRAME_STDOUT = 0x82,
        FRAME_STDERR = 0x83,
        FRAME_EXIT = 0x84,
        FRAME_FILE_DATA = 0x85,
        FRAME_SHUTDOWN_ACK = 0x86,
        FRAME_ERROR = 0xff,
};

enum exit_kind { EXIT_KIND_CODE = 0, EXIT_KIND_SIGNAL = 1 };

#endif
