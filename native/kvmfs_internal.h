/*
 * kvmfs_internal.h - what the native sources share: the public API plus the
 * helpers and internal structs that more than one .c file needs.
 */
#ifndef KVMFS_INTERNAL_H
#define KVMFS_INTERNAL_H

#include <stdint.h>
#include <stddef.h>
#include <errno.h>

#include "kvm_abi.h"
#include "kvmfs_native.h"

#define KVMFS_API __attribute__((visibility("default")))

#define PAGE_SHIFT 12
#define PAGE_SIZE 4096ull
#define KVM_MEM_LOG_DIRTY_PAGES 1u
#define KVM_MEM_READONLY 2u
#define KVM_MEM_GUEST_MEMFD 4u
#define KVMFS_ADDRESS_SPACES 2
#define KVMFS_USER_MEM_SLOTS 32764

#endif
