// Must NOT compile: a functor whose state the codec cannot encode (a std::unique_ptr member: not
// trivially copyable, and no cereal serialize()), with a message that says so.
#include <multiproc/pool.hpp>

#include <memory>
#include <vector>

struct Holder {
  std::unique_ptr<int> state;
  int operator()(int x) const { return x + (state ? *state : 0); }
};

int main() {
  multiproc::Pool pool{{.processes = 1}};
  std::vector<int> xs{1, 2, 3};
  auto ys = pool.map(Holder{}, xs);
  return static_cast<int>(ys.size());
}
