// Running a program written by `ubpdsl export --runtime executorch` from C++ (no Python).
//
//   PLAN_ID=0 et_main DIR X_FILE [SLOT_SO SLOT_SYMBOL SLOT_SYMBOL_EP]...
//
// One triple per kernel slot, in manifest.json's order ("-": no _ep symbol); PLAN_ID is the
// manifest's plan id (default 0). Follows DIR/README.md: libubp_et.so (linked) registers
// ubpdsl::subgraph.out; DIR/plan.bin is read into 64-byte aligned memory and validated
// (ubp_model_validate); each slot's kernel .so
// is dlopen'ed and bound into the plan (ubp_model_bind / ubp_model_bind_ep); a workspace of
// ubp_model_workspace_bytes is registered with ubp_et_register_plan; then DIR/model.pte is loaded
// with ExecuTorch's Program / Method API (XNNPACK backend and optimized kernels linked in) and run
// on X_FILE (float32 values of the program's input shape). The output is printed one value a line.
// Built by ubpdsl.deploy.et_export.build_cpp_example (c++ against the installed ExecuTorch wheel).
#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <executorch/extension/data_loader/file_data_loader.h>
#include <executorch/runtime/core/exec_aten/exec_aten.h>
#include <executorch/runtime/executor/method.h>
#include <executorch/runtime/executor/program.h>
#include <executorch/runtime/platform/runtime.h>

extern "C" {
int32_t ubp_model_bind(void *plan, int64_t slot, int32_t (*fn)(const float *, float *, int64_t, const void *));
int32_t ubp_model_bind_ep(void *plan, int64_t slot, void *fn_ep);
int64_t ubp_model_workspace_bytes(const void *plan);
int32_t ubp_model_validate(const void *plan, int64_t nbytes);
int32_t ubp_et_register_plan(int64_t id, const void *plan, void *workspace);
}

using executorch::extension::FileDataLoader;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::HierarchicalAllocator;
using executorch::runtime::MemoryAllocator;
using executorch::runtime::MemoryManager;
using executorch::runtime::Method;
using executorch::runtime::Program;
using executorch::runtime::Span;

static std::vector<char> read_file(const char *path) {
  std::vector<char> out;
  FILE *f = std::fopen(path, "rb");
  if (!f) return out;
  char buf[1 << 16];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) out.insert(out.end(), buf, buf + n);
  std::fclose(f);
  return out;
}

int main(int argc, char **argv) {
  if (argc < 3 || (argc - 3) % 3 != 0) {
    std::fprintf(stderr, "usage: %s DIR X_FILE [SLOT_SO SLOT_SYMBOL SLOT_SYMBOL_EP]...\n", argv[0]);
    return 1;
  }
  const std::string dir = argv[1];
  const int64_t plan_id = std::getenv("PLAN_ID") ? std::atoll(std::getenv("PLAN_ID")) : 0;
  executorch::runtime::runtime_init();

  std::vector<char> raw = read_file((dir + "/plan.bin").c_str());
  if (raw.empty()) return std::fprintf(stderr, "cannot read plan.bin\n"), 1;
  void *plan = std::aligned_alloc(64, (raw.size() + 63) / 64 * 64);
  std::memcpy(plan, raw.data(), raw.size());
  // plan.bin is a file: check every offset, size and packed blob in it before binding or running
  if (const int32_t rc = ubp_model_validate(plan, static_cast<int64_t>(raw.size())); rc != 0)
    return std::fprintf(stderr, "plan.bin is not a valid plan (ubp_model_validate: %d)\n", rc), 1;
  for (int i = 3, slot = 0; i < argc; i += 3, ++slot) {
    void *h = dlopen((dir + "/" + argv[i]).c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!h) return std::fprintf(stderr, "dlopen %s: %s\n", argv[i], dlerror()), 1;
    auto fn = reinterpret_cast<int32_t (*)(const float *, float *, int64_t, const void *)>(dlsym(h, argv[i + 1]));
    if (!fn || ubp_model_bind(plan, slot, fn) != 0) return std::fprintf(stderr, "bind %s\n", argv[i + 1]), 1;
    if (std::strcmp(argv[i + 2], "-") != 0) {
      void *ep = dlsym(h, argv[i + 2]);
      if (!ep || ubp_model_bind_ep(plan, slot, ep) != 0) return std::fprintf(stderr, "bind %s\n", argv[i + 2]), 1;
    }
  }
  const int64_t ws_bytes = ubp_model_workspace_bytes(plan);
  void *ws = std::aligned_alloc(64, (ws_bytes + 63) / 64 * 64 + 64);
  if (ubp_et_register_plan(plan_id, plan, ws) != 0) return std::fprintf(stderr, "register plan\n"), 1;

  auto loader = FileDataLoader::from((dir + "/model.pte").c_str());
  if (!loader.ok()) return std::fprintf(stderr, "cannot open model.pte\n"), 1;
  auto program = Program::load(&loader.get());
  if (!program.ok()) return std::fprintf(stderr, "Program::load failed: %d\n", (int)program.error()), 1;
  auto meta = program->method_meta("forward");
  if (!meta.ok()) return std::fprintf(stderr, "no forward method\n"), 1;
  std::vector<std::vector<uint8_t>> planned(meta->num_memory_planned_buffers());
  std::vector<Span<uint8_t>> spans;
  for (size_t i = 0; i < planned.size(); ++i) {
    planned[i].resize(meta->memory_planned_buffer_size(i).get());
    spans.emplace_back(planned[i].data(), planned[i].size());
  }
  HierarchicalAllocator planned_memory({spans.data(), spans.size()});
  static uint8_t method_pool[4 << 20];
  MemoryAllocator method_allocator(sizeof method_pool, method_pool);
  MemoryManager memory(&method_allocator, &planned_memory);
  auto method = program->load_method("forward", &memory);
  if (!method.ok()) return std::fprintf(stderr, "load_method failed: %d\n", (int)method.error()), 1;

  auto in_meta = meta->input_tensor_meta(0);
  std::vector<char> x = read_file(argv[2]);
  if (!in_meta.ok() || x.size() != in_meta->nbytes()) return std::fprintf(stderr, "bad X_FILE size\n"), 1;
  auto sizes = in_meta->sizes();
  auto dim_order = in_meta->dim_order();
  std::vector<executorch::aten::SizesType> sz(sizes.begin(), sizes.end());
  std::vector<executorch::aten::DimOrderType> order(dim_order.begin(), dim_order.end());
  std::vector<executorch::aten::StridesType> strides(sz.size());
  for (int64_t d = (int64_t)sz.size() - 1, s = 1; d >= 0; --d) strides[d] = s, s *= sz[d];
  executorch::aten::TensorImpl impl(executorch::aten::ScalarType::Float, sz.size(), sz.data(), x.data(),
                                    order.data(), strides.data());
  if (method->set_input(EValue(executorch::aten::Tensor(&impl)), 0) != Error::Ok)
    return std::fprintf(stderr, "set_input failed\n"), 1;
  const Error err = method->execute();
  if (err != Error::Ok) return std::fprintf(stderr, "execute failed: %d\n", (int)err), 2;
  const auto &out = method->get_output(0).toTensor();
  const float *y = out.const_data_ptr<float>();
  for (ssize_t i = 0; i < out.numel(); ++i) std::printf("%.9g\n", y[i]);
  return 0;
}
