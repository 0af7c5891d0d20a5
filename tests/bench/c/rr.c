// Request/response load for the benchmark: fixed-size requests echoed back, one blocking
// thread per connection, so each transaction costs exactly one write and the reads it needs
// on each side (no event loop in the way). Compiled by the benchmark with gcc at run time.
//
//   rr server --port P [--bind ADDR] [--lifetime S]
//       Echo every byte back, one thread per accepted connection, until the peer closes.
//   rr client --host IP --port P [--connections K] [--size B] [--duration S]
//       K connections; each sends B bytes, reads B bytes back, repeats for S seconds.
//       Prints one JSON line: {"requests", "seconds", "rps", "p50_us", "p90_us", "p99_us",
//       "mean_us", "errors", "error"}. Exit 0 only without errors.
//
// Every blocking call is bounded (SO_RCVTIMEO / SO_SNDTIMEO, and --lifetime for the server).
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define BUFFER_SIZE (64 * 1024)
#define MAX_CONNECTIONS 1024
#define IO_TIMEOUT_S 10

static const char *arg(int argc, char **argv, const char *name, const char *fallback)
{
	for (int i = 2; i + 1 < argc; i++)
		if (strcmp(argv[i], name) == 0)
			return argv[i + 1];
	return fallback;
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void set_timeouts(int fd)
{
	struct timeval tv = { .tv_sec = IO_TIMEOUT_S, .tv_usec = 0 };
	int one = 1;
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

static int write_all(int fd, const char *data, size_t len)
{
	while (len) {
		ssize_t n = write(fd, data, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		data += n;
		len -= (size_t)n;
	}
	return 0;
}

// ------------------------------------------------------------------ server

static void *serve(void *opaque)
{
	int fd = (int)(intptr_t)opaque;
	char *buffer = malloc(BUFFER_SIZE);

	set_timeouts(fd);
	while (buffer) {
		ssize_t n = read(fd, buffer, BUFFER_SIZE);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0 || write_all(fd, buffer, (size_t)n) < 0)
			break;
	}
	free(buffer);
	close(fd);
	return NULL;
}

static int run_server(int argc, char **argv)
{
	int port = atoi(arg(argc, argv, "--port", "0"));
	const char *bind_addr = arg(argc, argv, "--bind", "0.0.0.0");
	int lifetime = atoi(arg(argc, argv, "--lifetime", "3600"));
	struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
	int one = 1;
	int listener = socket(AF_INET, SOCK_STREAM, 0);

	if (listener < 0 || inet_pton(AF_INET, bind_addr, &addr.sin_addr) != 1) {
		perror("socket/--bind");
		return 2;
	}
	setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(listener, (struct sockaddr *)&addr, sizeof(addr)) < 0 ||
	    listen(listener, 1024) < 0) {
		perror("bind/listen");
		return 2;
	}
	alarm((unsigned)lifetime); // SIGALRM ends the process: it cannot outlive a lost harness
	printf("{\"event\": \"listening\", \"port\": %d}\n", port);
	fflush(stdout);
	for (;;) {
		int fd = accept(listener, NULL, NULL);
		pthread_t thread;
		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			perror("accept");
			return 1;
		}
		if (pthread_create(&thread, NULL, serve, (void *)(intptr_t)fd) != 0) {
			close(fd);
			continue;
		}
		pthread_detach(thread);
	}
}

// ------------------------------------------------------------------ client

struct worker {
	pthread_t thread;
	struct sockaddr_in target;
	size_t size;
	uint64_t deadline_ns;
	uint32_t *latencies_ns; // saturates at UINT32_MAX (4.3 s)
	size_t count, capacity;
	char error[160];
};

static int record(struct worker *w, uint64_t latency)
{
	if (w->count == w->capacity) {
		size_t capacity = w->capacity ? w->capacity * 2 : 65536;
		uint32_t *grown = realloc(w->latencies_ns, capacity * sizeof(uint32_t));
		if (!grown)
			return -1;
		w->latencies_ns = grown;
		w->capacity = capacity;
	}
	w->latencies_ns[w->count++] = latency > UINT32_MAX ? UINT32_MAX : (uint32_t)latency;
	return 0;
}

static void *client_worker(void *opaque)
{
	struct worker *w = opaque;
	char *request = malloc(w->size), *response = malloc(w->size);
	int fd = socket(AF_INET, SOCK_STREAM, 0);

	if (!request || !response || fd < 0) {
		snprintf(w->error, sizeof(w->error), "setup: %s", strerror(errno));
		goto out;
	}
	for (size_t i = 0; i < w->size; i++)
		request[i] = (char)('a' + i % 26);
	set_timeouts(fd);
	if (connect(fd, (struct sockaddr *)&w->target, sizeof(w->target)) < 0) {
		snprintf(w->error, sizeof(w->error), "connect: %s", strerror(errno));
		goto out;
	}
	while (now_ns() < w->deadline_ns) {
		uint64_t started = now_ns();
		size_t received = 0;
		if (write_all(fd, request, w->size) < 0) {
			snprintf(w->error, sizeof(w->error), "write: %s", strerror(errno));
			goto out;
		}
		while (received < w->size) {
			ssize_t n = read(fd, response + received, w->size - received);
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0) {
				snprintf(w->error, sizeof(w->error), "read: %s",
					 n == 0 ? "peer closed" : strerror(errno));
				goto out;
			}
			received += (size_t)n;
		}
		if (record(w, now_ns() - started) < 0) {
			snprintf(w->error, sizeof(w->error), "out of memory");
			goto out;
		}
	}
out:
	if (fd >= 0)
		close(fd);
	free(request);
	free(response);
	return NULL;
}

static int compare_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
	return (x > y) - (x < y);
}

static double percentile_us(const uint32_t *sorted, size_t n, double fraction)
{
	size_t index = (size_t)(fraction * (double)n);
	if (n == 0)
		return 0.0;
	return sorted[index < n ? index : n - 1] / 1000.0;
}

static int run_client(int argc, char **argv)
{
	int connections = atoi(arg(argc, argv, "--connections", "1"));
	double duration = atof(arg(argc, argv, "--duration", "3"));
	struct worker *workers;
	struct sockaddr_in target = { .sin_family = AF_INET };
	uint64_t started, elapsed;
	size_t total = 0, at = 0;
	uint32_t *merged;
	double sum_us = 0.0;
	int errors = 0;
	const char *first_error = "";
	long size = atol(arg(argc, argv, "--size", "1024"));

	target.sin_port = htons((uint16_t)atoi(arg(argc, argv, "--port", "0")));
	if (inet_pton(AF_INET, arg(argc, argv, "--host", ""), &target.sin_addr) != 1 ||
	    connections < 1 || connections > MAX_CONNECTIONS || size < 1 || size > BUFFER_SIZE ||
	    duration <= 0 || duration > 3600) {
		fprintf(stderr, "rr client: bad --host/--connections/--size/--duration\n");
		return 2;
	}
	workers = calloc((size_t)connections, sizeof(*workers));
	if (!workers)
		return 2;
	started = now_ns();
	for (int i = 0; i < connections; i++) {
		workers[i].target = target;
		workers[i].size = (size_t)size;
		workers[i].deadline_ns = started + (uint64_t)(duration * 1e9);
		pthread_create(&workers[i].thread, NULL, client_worker, &workers[i]);
	}
	for (int i = 0; i < connections; i++) {
		pthread_join(workers[i].thread, NULL);
		total += workers[i].count;
		if (workers[i].error[0]) {
			errors++;
			if (!first_error[0])
				first_error = workers[i].error;
		}
	}
	elapsed = now_ns() - started;
	merged = malloc((total ? total : 1) * sizeof(uint32_t));
	if (!merged)
		return 2;
	for (int i = 0; i < connections; i++) {
		memcpy(merged + at, workers[i].latencies_ns, workers[i].count * sizeof(uint32_t));
		at += workers[i].count;
	}
	qsort(merged, total, sizeof(uint32_t), compare_u32);
	for (size_t i = 0; i < total; i++)
		sum_us += merged[i] / 1000.0;
	printf("{\"requests\": %zu, \"seconds\": %.6f, \"rps\": %.1f, \"p50_us\": %.3f, "
	       "\"p90_us\": %.3f, \"p99_us\": %.3f, \"mean_us\": %.3f, \"errors\": %d, "
	       "\"error\": \"%s\"}\n",
	       total, elapsed / 1e9, total / (elapsed / 1e9), percentile_us(merged, total, 0.50),
	       percentile_us(merged, total, 0.90), percentile_us(merged, total, 0.99),
	       total ? sum_us / (double)total : 0.0, errors, first_error);
	return errors ? 1 : 0;
}

int main(int argc, char **argv)
{
	if (argc >= 2 && strcmp(argv[1], "server") == 0)
		return run_server(argc, argv);
	if (argc >= 2 && strcmp(argv[1], "client") == 0)
		return run_client(argc, argv);
	fprintf(stderr, "usage: rr server --port P | rr client --host IP --port P ...\n");
	return 2;
}
