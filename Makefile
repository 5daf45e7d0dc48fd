# Klinika PACS: one non-recursive Makefile.
#   make            all binaries into build/bin/
#   make run        install missing dependencies, build, start the whole system (scripts/run)
#   make test       the whole suite: unit, integration (real PostgreSQL, busd, dicomd, indexer)
#   make asan       the same suite built with ASan+UBSan (into build/asan)
#   make fuzz       libFuzzer drivers (clang) into build/fuzz; make fuzz-run runs each briefly
#   make bench      benchmarks (bench/), side by side with Orthanc
#   make fmt        clang-format every C/C++ source
#   make clean
# Sources are discovered by directory, so a new module needs no Makefile edit:
#   lib/*.c bus/*.c workers/common/*.c lib/dicom/*.cc  -> libkp.a
#   bus/busd/ gateway/dimse/ workers/indexer/ tools/pacsctl/ -> one binary each
#   tests/unit/**/test_*.c  -> one cmocka binary each

BUILD     ?= build
SANITIZER ?=
CC        ?= cc
CXX       ?= g++
OPT       ?= -O2

PKGS      := libzmq msgpack libpq openssl jansson inih libjwt libargon2 liboath libqrencode
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS  := $(shell pkg-config --libs $(PKGS) 2>/dev/null)
DCMTK_LIBS := -ldcmnet -ldcmtls -ldcmjpls -ldcmjpeg -ldcmimage -ldcmimgle -ldcmdata -loflog -lofstd -lpng -ljpeg

SANFLAGS  := $(if $(SANITIZER),-fsanitize=$(SANITIZER) -fno-omit-frame-pointer -fno-sanitize-recover=undefined,)
INCLUDES  := -Ilib -Ilib/dicom -Ibus -Iworkers/common
CFLAGS    += -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -g $(OPT) -MMD -MP $(INCLUDES) $(PKG_CFLAGS) $(SANFLAGS)
CXXFLAGS  += -std=c++17 -Wall -Wextra -Werror -g $(OPT) -MMD -MP $(INCLUDES) $(SANFLAGS)
LDFLAGS   += $(SANFLAGS) -pthread
# libharu (PDF reports, lib/kp_pdf.c) has no pkg-config file on Debian
LDLIBS    := $(PKG_LIBS) $(DCMTK_LIBS) -lhpdf -lz -lm

LIB_C     := $(wildcard lib/*.c bus/*.c workers/common/*.c)
LIB_CXX   := $(wildcard lib/dicom/*.cc)
LIB_OBJ   := $(LIB_C:%.c=$(BUILD)/obj/%.o) $(LIB_CXX:%.cc=$(BUILD)/obj/%.o)
LIBKP     := $(BUILD)/libkp.a

# binary name : source directory
PROGRAMS  := pacs-busd:bus/busd pacs-dicomd:gateway/dimse pacs-indexer:workers/indexer \
             pacs-auditor:workers/auditor pacs-reporter:workers/reporter \
             pacs-compressor:workers/compressor pacs-router:workers/router \
             pacsctl:tools/pacsctl pacs-gateway:gateway/http
prog_name = $(word 1,$(subst :, ,$1))
prog_dir  = $(word 2,$(subst :, ,$1))
BINS      := $(foreach p,$(PROGRAMS),$(BUILD)/bin/$(call prog_name,$p))

UNIT_SRC  := $(shell find tests/unit -name 'test_*.c' 2>/dev/null | sort)
UNIT_BINS := $(patsubst %.c,$(BUILD)/tests/%,$(notdir $(UNIT_SRC)))

.PHONY: all bins run test asan fuzz fuzz-run bench fmt clean deps unit ohif
all: $(BINS) $(UNIT_BINS) ohif
# the programs and the viewer only (what compose/Dockerfile builds: no test libraries needed)
bins: $(BINS) ohif

# The OHIF viewer pacs-gateway serves at / (http.ohif_dir): the pinned @ohif/app build from the
# npm registry, fetched once into build/ohif/dist (never committed). Offline, make goes on and
# says the viewer is unavailable.
OHIF_VERSION := 3.13.2
OHIF_SHA1    := 26a51ffcc1704c30fff403258a1d7392e9a991f3
ohif:
	@scripts/fetch-ohif $(OHIF_VERSION) $(OHIF_SHA1) build/ohif || true

$(LIBKP): $(LIB_OBJ)
	@mkdir -p $(dir $@)
	ar rcs $@ $^

$(BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/obj/%.o: %.cc
	@mkdir -p $(dir $@)
	$(CXX) $(CXXFLAGS) -c $< -o $@

# pacs-gateway (H2O 2.2.5 with its own event loop; see ../shared/deps.md): extra flags for its
# objects, its unit tests and its link line (LIBS_<program> is appended for that program only).
H2O_CFLAGS := -DH2O_USE_LIBUV=0 $(shell pkg-config --cflags libh2o-evloop 2>/dev/null)
H2O_LIBS  := $(shell pkg-config --libs libh2o-evloop openssl 2>/dev/null)
LIBS_pacs-gateway := $(H2O_LIBS)
# pacs-router sends STOW-RS with libcurl (Debian libcurl4-openssl-dev); only it links it
LIBS_pacs-router := $(shell pkg-config --libs libcurl 2>/dev/null || echo -lcurl)
$(BUILD)/obj/gateway/http/%.o: CFLAGS += $(H2O_CFLAGS)
$(BUILD)/obj/tests/unit/gateway/%.o: CFLAGS += -Igateway/http $(H2O_CFLAGS)
# unit tests of gateway modules link those objects (before libkp.a): UNIT_EXTRA_<test>
UNIT_EXTRA_test_qido := $(BUILD)/obj/gateway/http/kp_qido.o
UNIT_EXTRA_test_routes := $(addprefix $(BUILD)/obj/gateway/http/,kp_routes.o kp_qido.o kp_http.o kp_frames.o kp_multipart.o kp_mdcache.o kp_auth.o kp_api_auth.o kp_api_audit.o kp_api_admin.o kp_www.o kp_api_health.o kp_api_reports.o kp_metrics.o kp_api_modalities.o kp_api_routes.o kp_api_worklist.o kp_openapi.o)
UNIT_EXTRA_test_mdcache := $(BUILD)/obj/gateway/http/kp_mdcache.o
UNIT_EXTRA_test_ratelimit := $(BUILD)/obj/gateway/http/kp_ratelimit.o
UNIT_EXTRA_test_frames := $(BUILD)/obj/gateway/http/kp_frames.o
UNIT_EXTRA_test_multipart := $(BUILD)/obj/gateway/http/kp_multipart.o
UNIT_EXTRA_test_metrics := $(BUILD)/obj/gateway/http/kp_metrics.o
UNIT_EXTRA_test_find_sql := $(BUILD)/obj/gateway/dimse/kp_find_sql.o
UNIT_EXTRA_test_zap := $(BUILD)/obj/bus/busd/kp_zap.o
$(BUILD)/obj/tests/unit/bus/test_zap.o: CFLAGS += -Ibus/busd
$(BUILD)/obj/tests/unit/dimse/%.o: CFLAGS += -Igateway/dimse

define PROGRAM_RULE
$(BUILD)/bin/$(call prog_name,$1): $(patsubst %.c,$(BUILD)/obj/%.o,$(wildcard $(call prog_dir,$1)/*.c)) $(LIBKP)
	@mkdir -p $$(dir $$@)
	$(CXX) $(LDFLAGS) -o $$@ $$^ $(LDLIBS) $(LIBS_$(call prog_name,$1))
endef
$(foreach p,$(PROGRAMS),$(eval $(call PROGRAM_RULE,$p)))

define UNIT_RULE
$(BUILD)/tests/$(basename $(notdir $1)): $(BUILD)/obj/$(1:.c=.o) $(UNIT_EXTRA_$(basename $(notdir $1))) $(LIBKP)
	@mkdir -p $$(dir $$@)
	$(CXX) $(LDFLAGS) -o $$@ $$^ -lcmocka $(LDLIBS)
endef
$(foreach t,$(UNIT_SRC),$(eval $(call UNIT_RULE,$t)))

deps:
	@scripts/install-deps

run: deps all
	@scripts/run

test: deps all
	@BUILD=$(BUILD) tests/run

unit: all
	@BUILD=$(BUILD) tests/run --unit-only

asan:
	$(MAKE) BUILD=build/asan SANITIZER=address,undefined OPT=-O1 test

FUZZ_SRC  := $(wildcard tests/fuzz/fuzz_*.c)
fuzz:
	$(MAKE) BUILD=build/fuzz CC=clang CXX=clang++ SANITIZER=fuzzer-no-link,address,undefined OPT=-O1 build/fuzz/libkp.a
	@mkdir -p build/fuzz/bin
	@for f in $(FUZZ_SRC); do n=$$(basename $$f .c); echo "fuzzer $$n"; extra=""; \
	  case $$n in fuzz_qido) extra=gateway/http/kp_qido.c;; fuzz_frames) extra=gateway/http/kp_frames.c;; \
	    fuzz_multipart) extra=gateway/http/kp_multipart.c;; esac; objs=""; \
	  for x in $$f $$extra; do o=build/fuzz/$$(basename $$x .c).o; objs="$$objs $$o"; \
	    clang -std=c11 -D_GNU_SOURCE -g -O1 -fsanitize=fuzzer,address,undefined $(INCLUDES) \
	      -Igateway/http $(PKG_CFLAGS) -c $$x -o $$o || exit 1; done; \
	  clang++ -fsanitize=fuzzer,address,undefined $$objs build/fuzz/libkp.a \
	    -o build/fuzz/bin/$$n -pthread $(LDLIBS) || exit 1; done

# A bounded fuzzing session per driver over a scratch copy of its seed corpus (CI runs it).
FUZZ_SECONDS ?= 30
fuzz-run: fuzz
	@for f in $(FUZZ_SRC); do n=$$(basename $$f .c); c=$${n#fuzz_}; d=$$(mktemp -d); \
	  echo "fuzzing $$n for $(FUZZ_SECONDS)s"; \
	  build/fuzz/bin/$$n -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=4096 -print_final_stats=0 \
	    $$d tests/fuzz/corpus/$$c >$$d.log 2>&1 || { tail -50 $$d.log; exit 1; }; \
	  grep -E '^Done [0-9]+ runs' $$d.log; rm -rf $$d $$d.log; done

bench: all
	@bench/run

fmt:
	clang-format -i $$(git ls-files '*.c' '*.h' '*.cc')

clean:
	rm -rf build

-include $(shell find $(BUILD)/obj -name '*.d' 2>/dev/null)
