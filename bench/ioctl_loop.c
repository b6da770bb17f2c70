/*
 * ioctl_loop.c - time N identical ioctls on a file (the FUSE floor of a mount,
 * or the syscall floor of /dev/kvm).  Prints one line: "<ns per op> <ops>".
 *
 *   ioctl_loop FILE REQUEST ARG N
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	if (argc != 5) {
		fprintf(stderr, "usage: %s FILE REQUEST ARG N\n", argv[0]);
		return 2;
	}
	int fd = open(argv[1], O_RDWR);
	if (fd < 0) {
		perror(argv[1]);
		return 1;
	}
	unsigned long req = strtoul(argv[2], 0, 0), arg = strtoul(argv[3], 0, 0);
	long n = atol(argv[4]);
	struct timespec a, b;
	clock_gettime(CLOCK_MONOTONIC, &a);
	for (long i = 0; i < n; i++)
		if (ioctl(fd, req, arg) < 0) {
			perror("ioctl");
			return 1;
		}
	clock_gettime(CLOCK_MONOTONIC, &b);
	double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
	printf("%.0f %ld\n", ns / n, n);
	return 0;
}
